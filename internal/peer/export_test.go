package peer

var (
	SocketPath = socketPath
	PrivateDir = privateDir
)
