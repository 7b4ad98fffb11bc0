//go:build long

package clustertest_test

// burstLoad under `-tags long`: more peers, more traffic, about 40 s of it
// per scenario.
var burstLoad = loadProfile{Peers: 30, Rate: 1000, Size: 1024, Before: 10000, After: 30000}
