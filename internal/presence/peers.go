package presence

import "github.com/claudemesh/broker/internal/protocol"

// EncodePeersList renders a peers_list of entries in at most limit bytes.
// While the whole list fits, every peer is rendered in full (what v0.1
// clients always got). Otherwise each peer gets an equal share of the
// frame, and peers above it lose free text until they fit: cwd first, then
// summary, hostname, and groups from the last. Every live session of the
// mesh is still listed with its identity, status and node. Only if even
// such minimal peers cannot all fit (a MAX_CONNECTIONS_PER_MESH far above
// a thousand) is the list cut; how reports "trimmed" or "cut", or "" when
// nothing changed.
func EncodePeersList(reqID string, entries []Entry, limit int) (frame []byte, how string) {
	head := `{"type":"` + protocol.TypePeersList + `"`
	if reqID != "" {
		q, _ := Marshal(reqID)
		head += `,"_reqId":` + string(q)
	}
	head += `,"peers":[`
	const tail = "]}"
	peers := make([]protocol.Peer, len(entries))
	enc := make([][]byte, len(entries))
	total := len(head) + len(tail) + max(0, len(entries)-1)
	for i := range entries {
		peers[i] = entries[i].Peer()
		enc[i], _ = Marshal(peers[i])
		total += len(enc[i])
	}
	if total > limit {
		how = "trimmed"
		share := (limit - len(head) - len(tail) - max(0, len(entries)-1)) / max(1, len(entries))
		total = len(head) + len(tail) + max(0, len(entries)-1)
		for i := range enc {
			if len(enc[i]) > share {
				enc[i] = shrinkPeer(&peers[i], enc[i], share)
			}
			total += len(enc[i])
		}
	}
	b := make([]byte, 0, min(total, limit))
	b = append(b, head...)
	for i, p := range enc {
		sep := 0
		if i > 0 {
			sep = 1
		}
		if len(b)+sep+len(p)+len(tail) > limit {
			how = "cut"
			break
		}
		if sep == 1 {
			b = append(b, ',')
		}
		b = append(b, p...)
	}
	return append(b, tail...), how
}

// shrinkPeer shortens p's free text until its encoding takes at most
// budget bytes (or nothing is left to shorten) and returns the encoding.
func shrinkPeer(p *protocol.Peer, enc []byte, budget int) []byte {
	for _, f := range []*string{&p.Cwd, &p.Summary, &p.Hostname} {
		excess := len(enc) - budget
		if excess <= 0 {
			return enc
		}
		*f = TruncateJSON(*f, max(0, JSONLen(*f)-excess))
		enc, _ = Marshal(p)
	}
	for len(enc) > budget && len(p.Groups) > 0 {
		p.Groups = p.Groups[:len(p.Groups)-1]
		enc, _ = Marshal(p)
	}
	return enc
}
