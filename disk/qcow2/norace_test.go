package qcow2

// raceEnabled is set in race builds (race_test.go), whose tests run
// smaller workloads.
var raceEnabled bool
