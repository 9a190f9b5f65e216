package safefs

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// A state directory inside the app's volume: Sub refuses a link on the way,
// WriteFile replaces a link planted at the name instead of writing through
// it, Remove removes the link itself.
func TestSubWriteRemoveNeverThroughLinks(t *testing.T) {
	root, outside := setup(t)
	r, err := OpenRoot(root)
	must(t, err)
	defer r.Close()
	if _, err := r.Sub("dir-link/state"); !errors.Is(err, ErrLink) {
		t.Fatalf("Sub through a link: %v, want ErrLink", err)
	}
	sub, err := r.Sub(".podkeeper/multipart")
	must(t, err)
	defer sub.Close()
	must(t, os.Symlink(filepath.Join(outside, "token"), filepath.Join(root, ".podkeeper/multipart/j.json")))
	must(t, sub.WriteFile("j.json", []byte(`{"k":1}`), 0o600))
	if b, _ := os.ReadFile(filepath.Join(outside, "token")); string(b) != "SECRET" {
		t.Fatalf("the write went through the link: outside file now %q", b)
	}
	if b, err := sub.ReadFile("j.json"); err != nil || string(b) != `{"k":1}` {
		t.Fatalf("ReadFile: %q %v", b, err)
	}
	must(t, os.Remove(filepath.Join(root, ".podkeeper/multipart/j.json")))
	must(t, os.Symlink(filepath.Join(outside, "token"), filepath.Join(root, ".podkeeper/multipart/j.json")))
	if _, err := sub.ReadFile("j.json"); !errors.Is(err, ErrLink) {
		t.Fatalf("ReadFile of a link: %v, want ErrLink", err)
	}
	must(t, sub.Remove("j.json"))
	if _, err := os.Stat(filepath.Join(outside, "token")); err != nil {
		t.Fatalf("Remove followed the link: %v", err)
	}
	must(t, sub.Remove("j.json")) // missing: not an error
}
