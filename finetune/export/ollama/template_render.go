// template_render renders an Ollama Modelfile's TEMPLATE for conversations the way the Ollama
// server does, with Go's text/template and the standard library only (no Ollama needed).
//
// It reads JSON on stdin: {"modelfile": "<Modelfile text>", "conversations": [[{"role","content"}...]...]}
// and writes JSON on stdout: {"commands": [{"name","args"}...], "prompts": ["..."]}.
//
// What it mirrors from Ollama (MIT licence), so that a check here means the same thing there:
//   - parser/parser.go ParseFile: the Modelfile grammar (no escapes; a value ends at the first
//     newline where it forms a complete "..." or """...""" quote; non-printable runes dropped);
//   - server/routes.go ChatHandler: SYSTEM is prepended as a system message unless the
//     conversation starts with one;
//   - template/template.go Execute/collate: consecutive messages of one role are merged with a
//     blank line, .System is every system message joined, templates that use .Messages get
//     {System, Messages, Tools, Response: ""...} with missingkey=zero and the "json" function.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
)

type command struct {
	Name string `json:"name"`
	Args string `json:"args"`
}

type Message struct {
	Role      string   `json:"role"`
	Content   string   `json:"content"`
	Thinking  string   `json:"thinking,omitempty"`
	Images    []string `json:"images,omitempty"`
	ToolCalls []any    `json:"tool_calls,omitempty"`
	ToolName  string   `json:"tool_name,omitempty"`
}

type request struct {
	Modelfile     string       `json:"modelfile"`
	Conversations [][]*Message `json:"conversations"`
}

type response struct {
	Commands []command `json:"commands"`
	Prompts  []string  `json:"prompts"`
}

// ---- Modelfile parser (port of ollama/parser/parser.go ParseFile) ----

type state int

const (
	stateNil state = iota
	stateName
	stateValue
	stateParameter
	stateMessage
	stateComment
)

var errInvalidCommand = errors.New("command must be one of \"from\", \"license\", \"template\", \"system\", \"adapter\", \"draft\", \"renderer\", \"parser\", \"parameter\", \"message\", or \"requires\"")

func parseModelfile(text string) ([]command, error) {
	var cmds []command
	var cmd command
	var curr state
	var b bytes.Buffer
	var role string
	line := 1
	br := bufio.NewReader(strings.NewReader(strings.TrimPrefix(text, "\uFEFF")))
	for {
		r, _, err := br.ReadRune()
		if errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, err
		}
		if isNewline(r) {
			line++
		}
		next, r, err := parseRuneForState(r, curr)
		if err != nil {
			return nil, fmt.Errorf("(line %d): %v", line, err)
		}
		if next != curr {
			switch curr {
			case stateName:
				if !isValidCommand(b.String()) {
					return nil, fmt.Errorf("(line %d): %v", line, errInvalidCommand)
				}
				switch s := strings.ToLower(b.String()); s {
				case "from":
					cmd.Name = "model"
				case "parameter":
					next = stateParameter
				case "message":
					next = stateMessage
					cmd.Name = s
				default:
					cmd.Name = s
				}
			case stateParameter:
				cmd.Name = b.String()
			case stateMessage:
				role = b.String()
			case stateValue:
				s, ok := unquote(strings.TrimSpace(b.String()))
				if !ok || isSpace(r) {
					b.WriteRune(r)
					continue
				}
				if role != "" {
					s = role + ": " + s
					role = ""
				}
				cmd.Args = s
				cmds = append(cmds, cmd)
			}
			b.Reset()
			curr = next
		}
		if strconv.IsPrint(r) {
			b.WriteRune(r)
		}
	}
	switch curr {
	case stateComment, stateNil:
	case stateValue:
		s, ok := unquote(strings.TrimSpace(b.String()))
		if !ok {
			return nil, fmt.Errorf("unexpected EOF: unterminated quote: %s", b.String())
		}
		if role != "" {
			s = role + ": " + s
		}
		cmd.Args = s
		cmds = append(cmds, cmd)
	default:
		return nil, errors.New("unexpected EOF")
	}
	for _, c := range cmds {
		if c.Name == "model" {
			return cmds, nil
		}
	}
	return nil, errors.New("no FROM line")
}

func parseRuneForState(r rune, cs state) (state, rune, error) {
	switch cs {
	case stateNil:
		switch {
		case r == '#':
			return stateComment, 0, nil
		case isSpace(r), isNewline(r):
			return stateNil, 0, nil
		default:
			return stateName, r, nil
		}
	case stateName:
		switch {
		case isAlpha(r):
			return stateName, r, nil
		case isSpace(r):
			return stateValue, 0, nil
		default:
			return stateNil, 0, errInvalidCommand
		}
	case stateValue:
		switch {
		case isNewline(r), isSpace(r):
			return stateNil, r, nil
		default:
			return stateValue, r, nil
		}
	case stateParameter:
		switch {
		case isAlpha(r), isNumber(r), r == '_':
			return stateParameter, r, nil
		case isSpace(r):
			return stateValue, 0, nil
		default:
			return stateNil, 0, io.ErrUnexpectedEOF
		}
	case stateMessage:
		switch {
		case isAlpha(r):
			return stateMessage, r, nil
		case isSpace(r):
			return stateValue, 0, nil
		default:
			return stateNil, 0, io.ErrUnexpectedEOF
		}
	case stateComment:
		if isNewline(r) {
			return stateNil, 0, nil
		}
		return stateComment, 0, nil
	}
	return stateNil, 0, errors.New("")
}

func unquote(s string) (string, bool) {
	if len(s) >= 3 && s[:3] == `"""` {
		if len(s) >= 6 && s[len(s)-3:] == `"""` {
			return s[3 : len(s)-3], true
		}
		return "", false
	}
	if len(s) >= 1 && s[0] == '"' {
		if len(s) >= 2 && s[len(s)-1] == '"' {
			return s[1 : len(s)-1], true
		}
		return "", false
	}
	return s, true
}

func isAlpha(r rune) bool   { return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' }
func isNumber(r rune) bool  { return r >= '0' && r <= '9' }
func isSpace(r rune) bool   { return r == ' ' || r == '\t' }
func isNewline(r rune) bool { return r == '\r' || r == '\n' }

func isValidCommand(cmd string) bool {
	switch strings.ToLower(cmd) {
	case "from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message", "requires":
		return true
	}
	return false
}

// ---- template execution (port of ollama/template/template.go, .Messages path) ----

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

func identifiers(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
		return names
	case *parse.TemplateNode:
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		names := identifiers(n.Pipe)
		for _, l := range []*parse.ListNode{n.List, n.ElseList} {
			if l != nil {
				names = append(names, identifiers(l)...)
			}
		}
		return names
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
		return names
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

func collate(msgs []*Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == m.Role && m.Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + m.Content
		} else {
			c := *m
			collated = append(collated, &c)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func render(cmds []command, conv []*Message) (string, error) {
	var tmplText, system string
	var fixed []*Message // MESSAGE lines come before the conversation
	for _, c := range cmds {
		switch c.Name {
		case "template":
			tmplText = c.Args
		case "system":
			system = c.Args
		case "message":
			role, content, _ := strings.Cut(c.Args, ": ")
			fixed = append(fixed, &Message{Role: role, Content: content})
		}
	}
	if tmplText == "" {
		return "", errors.New("the Modelfile has no TEMPLATE")
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(tmplText)
	if err != nil {
		return "", fmt.Errorf("TEMPLATE does not parse: %v", err)
	}
	usesMessages := false
	for _, t := range tmpl.Templates() {
		for _, id := range identifiers(t.Root) {
			if strings.ToLower(id) == "messages" {
				usesMessages = true
			}
		}
	}
	if !usesMessages {
		return "", errors.New("TEMPLATE does not use .Messages (the legacy .Prompt/.Response form renders multi-turn chats differently)")
	}
	msgs := append(append([]*Message{}, fixed...), conv...)
	if len(conv) > 0 && conv[0].Role != "system" && system != "" {
		msgs = append([]*Message{{Role: "system", Content: system}}, msgs...)
	}
	sys, collated := collate(msgs)
	var b bytes.Buffer
	err = tmpl.Execute(&b, map[string]any{
		"System": sys, "Messages": collated, "Tools": []any(nil), "Response": "",
		"Think": false, "IsThinkSet": false, "Query": "", "Document": "", "Instruction": "",
	})
	if err != nil {
		return "", fmt.Errorf("TEMPLATE fails to execute: %v", err)
	}
	return b.String(), nil
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "bad request:", err)
		os.Exit(2)
	}
	cmds, err := parseModelfile(req.Modelfile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "Modelfile does not parse:", err)
		os.Exit(1)
	}
	out := response{Commands: cmds, Prompts: []string{}}
	for i, conv := range req.Conversations {
		prompt, err := render(cmds, conv)
		if err != nil {
			fmt.Fprintf(os.Stderr, "conversation %d: %v\n", i, err)
			os.Exit(1)
		}
		out.Prompts = append(out.Prompts, prompt)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
