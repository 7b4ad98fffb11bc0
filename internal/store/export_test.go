package store

// HotStatements returns the hot statements' SQL by name, for tests.
func HotStatements() map[string]string {
	m := map[string]string{}
	for _, st := range hotStatements {
		m[st.name] = st.sql
	}
	return m
}
