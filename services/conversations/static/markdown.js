// A small markdown renderer that builds DOM nodes directly: text is only ever set with textContent and
// no HTML string is parsed, so model output and user input cannot inject markup or script (a `<script>`
// in a message shows as text). Supports fenced code blocks, headings, lists, quotes, paragraphs, and
// inline code, bold, italics and http(s) links.
"use strict";

(function () {
  const SAFE_LINK = /^(https?:\/\/|mailto:)/i;

  function inline(parent, text) {
    // Tokens: `code`, **bold**, *italic* or _italic_, [label](url). Anything else is text.
    const pattern = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\b_([^_]+)_\b|\[([^\]]+)\]\(([^)\s]+)\)/g;
    let last = 0;
    for (const match of text.matchAll(pattern)) {
      if (match.index > last) parent.append(document.createTextNode(text.slice(last, match.index)));
      if (match[2] !== undefined) {
        const code = document.createElement("code");
        code.textContent = match[2];
        parent.append(code);
      } else if (match[3] !== undefined) {
        const strong = document.createElement("strong");
        inline(strong, match[3]);
        parent.append(strong);
      } else if (match[4] !== undefined || match[5] !== undefined) {
        const em = document.createElement("em");
        inline(em, match[4] ?? match[5]);
        parent.append(em);
      } else if (SAFE_LINK.test(match[7])) {
        const a = document.createElement("a");
        a.href = match[7];
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
        a.textContent = match[6];
        parent.append(a);
      } else {
        parent.append(document.createTextNode(match[0]));
      }
      last = match.index + match[0].length;
    }
    if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
  }

  function paragraph(parent, lines) {
    if (!lines.length) return;
    const p = document.createElement("p");
    lines.forEach((line, i) => {
      if (i) p.append(document.createElement("br"));
      inline(p, line);
    });
    parent.append(p);
  }

  function render(source) {
    const root = document.createDocumentFragment();
    const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
    let para = [];
    const flush = () => { paragraph(root, para); para = []; };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)/);
      if (fence) {
        flush();
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        if (fence[2]) code.className = "language-" + fence[2];
        code.textContent = body.join("\n");
        pre.append(code);
        root.append(pre);
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        flush();
        const h = document.createElement("h" + Math.min(heading[1].length + 2, 6));
        inline(h, heading[2]);
        root.append(h);
        continue;
      }
      const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
      if (item) {
        flush();
        const ordered = /\d/.test(item[1]);
        const list = document.createElement(ordered ? "ol" : "ul");
        while (i < lines.length) {
          const next = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
          if (!next || /\d/.test(next[1]) !== ordered) break;
          const li = document.createElement("li");
          inline(li, next[2]);
          list.append(li);
          i++;
        }
        i--;
        root.append(list);
        continue;
      }
      if (/^\s*>/.test(line)) {
        flush();
        const quote = document.createElement("blockquote");
        const quoted = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
        i--;
        quote.append(render(quoted.join("\n")));
        root.append(quote);
        continue;
      }
      if (!line.trim()) { flush(); continue; }
      para.push(line);
    }
    flush();
    return root;
  }

  window.ferryMarkdown = { render };
})();
