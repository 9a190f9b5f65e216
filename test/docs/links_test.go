package docs

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestRelativeLinks fails when a relative link in README.md or docs/*.md points
// to a file that does not exist or to a #anchor that is no heading of its file.
func TestRelativeLinks(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(Root(), "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	files = append([]string{Readme()}, files...)
	if len(files) < 2 {
		t.Fatalf("no docs/*.md found next to %s", Readme())
	}
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range links(string(b)) {
			n++
			if err := checkLink(f, l.target); err != nil {
				t.Errorf("%s:%d: link %q: %v", rel(f), l.line, l.target, err)
			}
		}
	}
	if n == 0 {
		t.Fatal("found no links at all: the link parser is broken")
	}
}

// TestLinkCheckCatchesBrokenLinks: the checker itself refuses a missing file, a
// missing anchor in another file and a missing anchor in the same file.
func TestLinkCheckCatchesBrokenLinks(t *testing.T) {
	from := filepath.Join(Root(), "docs", "testing.md")
	for _, bad := range []string{"nope.md", "design.md#no-such-heading", "#no-such-heading", "../no-such-dir/"} {
		if checkLink(from, bad) == nil {
			t.Errorf("link %q was accepted", bad)
		}
	}
	for _, good := range []string{"design.md", "design.md#dependencies", "#tiers", "../README.md#quick-start", "../agents/snapshot/"} {
		if err := checkLink(from, good); err != nil {
			t.Errorf("link %q: %v", good, err)
		}
	}
}

type link struct {
	line   int
	target string
}

var (
	inlineLink = regexp.MustCompile(`\]\(([^)\s]+)(?:\s+"[^"]*")?\)`)
	codeSpan   = regexp.MustCompile("`[^`]*`")
)

// links returns the inline link targets of a markdown text outside fenced code
// blocks and code spans.
func links(text string) []link {
	var out []link
	fenced := false
	for i, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			fenced = !fenced
			continue
		}
		if fenced {
			continue
		}
		for _, m := range inlineLink.FindAllStringSubmatch(codeSpan.ReplaceAllString(line, ""), -1) {
			out = append(out, link{i + 1, m[1]})
		}
	}
	return out
}

// checkLink resolves target relative to the file from; external links pass.
func checkLink(from, target string) error {
	if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
		return nil
	}
	path, anchor, _ := strings.Cut(target, "#")
	file := from
	if path != "" {
		if filepath.IsAbs(path) {
			return fmt.Errorf("absolute path")
		}
		file = filepath.Join(filepath.Dir(from), filepath.FromSlash(path))
		if _, err := os.Stat(file); err != nil {
			return fmt.Errorf("no such file %s", rel(file))
		}
	}
	if anchor == "" {
		return nil
	}
	if !strings.HasSuffix(file, ".md") {
		return fmt.Errorf("anchor on a file that is not markdown")
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	if !anchors(string(b))[anchor] {
		return fmt.Errorf("%s has no heading with anchor #%s", rel(file), anchor)
	}
	return nil
}

var notSlug = regexp.MustCompile(`[^\p{L}\p{N}\- _]`)

// anchors returns the heading anchors GitHub generates for a markdown text:
// lower case, punctuation dropped, spaces to hyphens, repeats suffixed -1, -2...
func anchors(text string) map[string]bool {
	seen := map[string]int{}
	out := map[string]bool{}
	fenced := false
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			fenced = !fenced
			continue
		}
		if fenced || !strings.HasPrefix(line, "#") {
			continue
		}
		h := strings.TrimLeft(line, "#")
		if !strings.HasPrefix(h, " ") {
			continue
		}
		slug := strings.ReplaceAll(notSlug.ReplaceAllString(strings.ToLower(strings.TrimSpace(h)), ""), " ", "-")
		if k := seen[slug]; k > 0 {
			out[fmt.Sprintf("%s-%d", slug, k)] = true
		} else {
			out[slug] = true
		}
		seen[slug]++
	}
	return out
}
