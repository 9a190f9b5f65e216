package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestFlags(t *testing.T) {
	var errb bytes.Buffer
	if code := run([]string{"-failure-policy", "Sometimes"}, &errb); code != 2 || !strings.Contains(errb.String(), "-failure-policy") {
		t.Errorf("bad -failure-policy: exit %d, %q", code, errb.String())
	}
	errb.Reset()
	t.Setenv("POD_NAMESPACE", "")
	if code := run(nil, &errb); code != 2 || !strings.Contains(errb.String(), "-namespace") {
		t.Errorf("no namespace: exit %d, %q", code, errb.String())
	}
	errb.Reset()
	if code := run([]string{"-log-level", "loudest", "-namespace", "x"}, &errb); code != 2 || !strings.Contains(errb.String(), "loudest") {
		t.Errorf("bad -log-level: exit %d, %q", code, errb.String())
	}
}
