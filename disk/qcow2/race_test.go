//go:build race

package qcow2

func init() { raceEnabled = true }
