// Renders a Helm chart the way `helm template` does, for the tests: Go's
// text/template with the sprig functions and Helm's own `include`,
// `toYaml`, `required` and `tpl`-free built-ins, `.Values` from the
// chart's values.yaml overlaid with `-set-file` YAML, `.Release` and
// `.Chart`. Helm itself is not packaged in Debian; its template engine is
// these libraries, which are.
//
// Documents come out in the order Helm installs them (by kind), each
// with its `# Source:` line; with -json, as one JSON object a line.
//
// Usage: chart-render [-json] CHART_DIR RELEASE NAMESPACE [VALUES.yaml]
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

func readYAML(path string) map[string]interface{} {
	out := map[string]interface{}{}
	data, err := os.ReadFile(path)
	if err != nil {
		fail(err)
	}
	if err := yaml.Unmarshal(data, &out); err != nil {
		fail(fmt.Errorf("%s: %w", path, err))
	}
	return out
}

// merge overlays b onto a, as helm's -f does.
func merge(a, b map[string]interface{}) map[string]interface{} {
	for k, v := range b {
		if bm, ok := v.(map[string]interface{}); ok {
			if am, ok := a[k].(map[string]interface{}); ok {
				a[k] = merge(am, bm)
				continue
			}
		}
		a[k] = v
	}
	return a
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "chart-render:", err)
	os.Exit(1)
}

// Helm's install order, for the kinds a chart of ours has.
var installOrder = []string{
	"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
	"Role", "RoleBinding", "ConfigMap", "DaemonSet", "Job",
}

func rank(kind string) int {
	for i, k := range installOrder {
		if k == kind {
			return i
		}
	}
	return len(installOrder)
}

type document struct {
	source string
	text   string
	kind   string
}

func main() {
	args := os.Args[1:]
	asJSON := len(args) > 0 && args[0] == "-json"
	if asJSON {
		args = args[1:]
	}
	if len(args) < 3 {
		fail(fmt.Errorf("usage: chart-render [-json] CHART_DIR RELEASE NAMESPACE [VALUES.yaml]"))
	}
	dir, release, namespace := args[0], args[1], args[2]
	chart := readYAML(filepath.Join(dir, "Chart.yaml"))
	values := readYAML(filepath.Join(dir, "values.yaml"))
	if len(args) > 3 {
		values = merge(values, readYAML(args[3]))
	}
	top := map[string]interface{}{
		"Values":  values,
		"Release": map[string]interface{}{"Name": release, "Namespace": namespace, "Service": "Helm"},
		"Chart": map[string]interface{}{
			"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"],
		},
	}
	root := template.New("chart").Option("missingkey=error")
	funcs := sprig.TxtFuncMap()
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["toYaml"] = func(v interface{}) string {
		var buf bytes.Buffer
		enc := yaml.NewEncoder(&buf)
		enc.SetIndent(2)
		if err := enc.Encode(v); err != nil {
			return ""
		}
		return strings.TrimSuffix(buf.String(), "\n")
	}
	funcs["required"] = func(message string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf("%s", message)
		}
		return v, nil
	}
	root.Funcs(funcs)
	files, err := filepath.Glob(filepath.Join(dir, "templates", "*"))
	if err != nil {
		fail(err)
	}
	sort.Strings(files)
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			fail(err)
		}
		if _, err := root.New(filepath.Base(file)).Parse(string(data)); err != nil {
			fail(err)
		}
	}
	var docs []document
	for _, file := range files {
		name := filepath.Base(file)
		if strings.HasPrefix(name, "_") {
			continue
		}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, top); err != nil {
			fail(err)
		}
		for _, text := range strings.Split(buf.String(), "\n---\n") {
			if strings.TrimSpace(text) == "" {
				continue
			}
			var head struct{ Kind string }
			if err := yaml.Unmarshal([]byte(text), &head); err != nil {
				fail(fmt.Errorf("templates/%s renders invalid YAML: %w\n%s", name, err, text))
			}
			docs = append(docs, document{fmt.Sprintf("%s/templates/%s", chart["name"], name), strings.TrimSpace(text), head.Kind})
		}
	}
	sort.SliceStable(docs, func(i, j int) bool { return rank(docs[i].kind) < rank(docs[j].kind) })
	for _, doc := range docs {
		if asJSON {
			var value interface{}
			if err := yaml.Unmarshal([]byte(doc.text), &value); err != nil {
				fail(err)
			}
			line, err := json.Marshal(value)
			if err != nil {
				fail(fmt.Errorf("%s: %w", doc.source, err))
			}
			fmt.Println(string(line))
		} else {
			fmt.Printf("---\n# Source: %s\n%s\n", doc.source, doc.text)
		}
	}
}
