// Package backends links every store backend into a binary: agents that open
// a store import it for its side effect, agents without one do not, and so
// stay free of the AWS SDK.
package backends

import (
	_ "github.com/podkeeper/podkeeper/agents/store/file"
	_ "github.com/podkeeper/podkeeper/agents/store/s3"
)
