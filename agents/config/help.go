package config

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Help writes the --help text of an agent: a summary line, then every variable
// with its default and description, generated from cfg's tags so it cannot drift
// from what Load reads.
func Help(w io.Writer, name, summary string, cfg any) {
	fmt.Fprintf(w, "%s — %s\n\nUsage: %s [--help] [--version]\n\nConfigured by environment variables:\n\n", name, summary, name)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  VARIABLE\tDEFAULT\tDESCRIPTION")
	for _, v := range Vars(cfg) {
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", v.Name, helpDefault(v), describe(v))
	}
	tw.Flush()
	fmt.Fprintln(w, "\nExit codes: 0 success, 1 runtime failure, 2 configuration error.")
}

// Markdown renders the variables of cfg as a configuration table of docs/.
// A test (test/docs) compares docs/NAME.md with this output.
func Markdown(cfg any) string {
	var b strings.Builder
	b.WriteString("| Variable | Default | Description |\n|---|---|---|\n")
	for _, v := range Vars(cfg) {
		def := helpDefault(v)
		if def != "(required)" && def != "" {
			def = "`" + def + "`"
		}
		fmt.Fprintf(&b, "| `%s` | %s | %s |\n", v.Name, def, strings.ReplaceAll(describe(v), "|", "\\|"))
	}
	return b.String()
}

func helpDefault(v Var) string {
	switch {
	case v.Required:
		return "(required)"
	case v.Default == "":
		return ""
	}
	return v.Default
}

func describe(v Var) string {
	d := v.Help
	if len(v.Enum) > 0 {
		shown := make([]string, len(v.Enum))
		for i, e := range v.Enum {
			shown[i] = e
			if e == "" {
				shown[i] = "(empty)"
			}
		}
		d += " One of: " + strings.Join(shown, ", ") + "."
	}
	return d
}
