package store

// SessionSettings returns the settings of the store's connections, for
// tests that open their own connections like them.
func SessionSettings() map[string]string { return sessionSettings() }

// HotStatements returns the hot statements' SQL by name, for tests.
func HotStatements() map[string]string {
	m := map[string]string{}
	for _, st := range hotStatements {
		m[st.name] = st.sql
	}
	return m
}
