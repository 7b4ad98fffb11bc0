//go:build !long

package clustertest_test

// burstLoad is the default suite's load: about 5 s of traffic per
// scenario.
var burstLoad = loadProfile{Peers: 9, Rate: 300, Size: 256, Before: 600, After: 900}
