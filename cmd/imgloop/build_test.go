package main

// raceEnabled is set when the tests run under -race: the binary under
// test is then built with -race too.
var raceEnabled bool
