// Package hostfiletest holds test doubles of the host file layer, for
// tests only (as net/http/httptest is to net/http): MemFile, an
// in-memory file that a test can "crash" (dropping what was not synced),
// and Faulty, a wrapper that fails a chosen operation. Both satisfy
// disk.File and the optional host file interfaces.
//
// # Concurrency
//
// All methods are safe for concurrent use.
package hostfiletest
