package members

import (
	"os"
	"testing"

	"github.com/claudemesh/broker/internal/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
