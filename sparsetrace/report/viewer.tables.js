// The page's tables: the run's summary (saying what its sparsity and compression numbers mean),
// fidelity, and the results of the run (needle, attribution, run facts and other tables, figures).
// Part of the viewer's function scope (viewer.js): uses its data, S, el and fmt; start() calls tables().

  /** Two-column rows [name, value] (a string or a node) into `table`. */
  function facts(table, rows) {
    for (const [name, value] of rows) {
      const tr = el("tr");
      const cell = el("td");
      cell.append(value);
      tr.append(el("td", {}, name), cell);
      table.append(tr);
    }
  }

  /** A JSON value as HTML: an object as a two-column table, a list of objects as a grid (a column per
   * key), a list of plain values inline, nested values inside. */
  function valueNode(value) {
    if (value === null || typeof value !== "object") {
      return document.createTextNode(typeof value === "number" && !Number.isInteger(value) ? fmt(value, 4) : String(value));
    }
    if (Array.isArray(value)) {
      if (value.every((x) => x === null || typeof x !== "object")) {
        return document.createTextNode(value.map((x) => valueNode(x).textContent).join(", "));
      }
      if (value.every((x) => x && typeof x === "object" && !Array.isArray(x))) {
        const keys = [...new Set(value.flatMap((x) => Object.keys(x)))];
        const table = el("table", { class: "grid" });
        const head = el("tr");
        for (const key of keys) head.append(el("th", {}, key));
        table.append(head);
        for (const x of value) {
          const tr = el("tr");
          for (const key of keys) {
            const cell = el("td");
            if (key in x) cell.append(valueNode(x[key]));
            tr.append(cell);
          }
          table.append(tr);
        }
        return table;
      }
      const list = el("ol", { class: "values" });
      for (const x of value) {
        const item = el("li");
        item.append(valueNode(x));
        list.append(item);
      }
      return list;
    }
    const table = el("table", { class: "facts" });
    facts(table, Object.entries(value).map(([key, x]) => [key, valueNode(x)]));
    return table;
  }

  function summaryTable() {
    const st = S.stats;
    const pruned = `${fmt(100 * st.sparsity, 1)}% of the causal token pairs are not computed ` +
      `(${fmt(100 * st.block_sparsity, 1)}% of the block grid)`;
    facts($("summary-table"), [
      ["model", S.model || "?"],
      ["tokens", `${fmt(S.tokens)}   (${NQ} query blocks of ${S.block_q}, ${NK} key blocks of ${S.block_k})`],
      ["layers x heads", `${L} x ${H}`],
      ["estimator", Object.entries(S.config).map(([k, v]) => `${k}=${v}`).join(", ")],
      ["kept blocks", `${fmt(st.kept_blocks)} (${fmt(st.selected_blocks)} selected + ${fmt(st.forced_blocks)} sink/local)`],
      ["kept per row", `${fmt(st.kept_per_row_mean, 1)} key blocks on average, at most ${fmt(st.kept_per_row_max)}, ` +
        `of ${fmt(NK)}; a row is one query block of one layer and head (the bars right of the map: each row of the head shown)`],
      ["pruned", pruned + (st.sparsity <= 0 ? ": every row keeps every key block it can read (k is at least the " +
        "blocks a row can read)" : "")],
      ["size", `trace ${fmt(st.trace_bytes / 1e6, 2)} MB; the dense fp16 attention patterns (layers x heads x T x T) ` +
        `would take ${fmt(st.dense_pattern_bytes / 1e9, 2)} GB`],
      ["compression", `${fmt(st.compression, 0)}x as the paper counts it (T\u00b2 / kept blocks, per layer and head); ` +
        `in bytes the trace is ${fmt(st.dense_to_trace_ratio, 0)}x smaller (bytes of the dense T x T patterns / bytes ` +
        `of the trace). Both measure storage, not pruning: one kept block stands for up to ${S.block_q} x ${S.block_k} ` +
        "token pairs, so the compression is large even where little is pruned."],
    ]);
    if (data.text_note) { $("text-note").textContent = data.text_note; $("text-note").hidden = false; }
  }

  function numberGrid(headers, rows) {
    const table = el("table", { class: "grid" });
    const head = el("tr");
    for (const h of headers) head.append(el("th", { class: "num" }, h));
    table.append(head);
    for (const r of rows) {
      const tr = el("tr");
      for (const v of r) tr.append(el("td", { class: "num" }, fmt(v, 3)));
      table.append(tr);
    }
    return table;
  }

  /** Summary, fidelity and results: everything below the map. */
  function tables() {
    summaryTable();
    const niah = data.extra && data.extra.niah;
    const f = data.fidelity;
    if (f) {
      const body = $("fidelity-body");
      const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
      const lines = [];
      if (f.recall) lines.push(["attention recall", `${fmt(mean(f.recall), 3)} of the dense attention inside the kept blocks, ` +
        `oracle ${fmt(mean(f.oracle_recall), 3)} (ratio ${fmt(mean(f.recall_ratio), 3)}), mean over layers`]);
      if (f.match !== undefined) lines.push(["behaviour", `sparse model ${f.match ? "reproduces" : "does NOT reproduce"} the dense ` +
        `greedy continuation; KL(dense||sparse) next token ${fmt(f.kl_next_token, 4)}, top-1 agreement ${fmt(f.top1_agreement, 3)}`]);
      const table = el("table", { class: "facts" });
      facts(table, lines);
      body.append(table);
      if (f.recall) {
        body.append(el("h3", {}, "per layer"));
        body.append(numberGrid(["layer", "recall", "oracle", "ratio"], f.recall.map((r, l) => [l, r, f.oracle_recall[l], f.recall_ratio[l]])));
      }
      $("fidelity").hidden = false;
    }

    const results = $("results-body");
    if (niah) {
      const route = niah.route || {};
      const prompt = niah.prompt || {};
      results.append(el("h3", {}, "Needle in a haystack"));
      const table = el("table", { class: "facts", id: "niah-table" });
      facts(table, [
        ["needle", `${prompt.key ?? "?"} = ${prompt.answer ?? "?"} at depth ${prompt.depth ?? "?"} (blocks ${route.needle_blocks ?? "?"})`],
        ["dense answer", `${JSON.stringify(niah.dense_answer)} (${niah.correct ? "right" : "wrong"})`],
        ["budget", `${niah.budget ?? "k = " + niah.k}${niah.min_k !== null && niah.min_k !== undefined ? " (smallest k that keeps the answer)" : ""}; answer ${niah.answer_kept ? "kept" : "LOST"} by the sparse model`],
        ["route", `needle -> answer ${route.connected ? "connected" : "NOT connected"} (threshold ${route.threshold})`],
      ]);
      results.append(table);
    }
    const attribution = data.attribution;
    if (attribution) {
      results.append(el("h3", {}, "Context attribution"));
      const about = el("table", { class: "facts" });
      facts(about, [
        ["query", attribution.query ?? "(prompt given whole)"],
        ["response", JSON.stringify(attribution.response)],
        ["score", `${attribution.method}: the response's attention on each source; top ${attribution.sources.length} of ${attribution.num_sources}`],
      ]);
      results.append(about);
      const table = el("table", { class: "grid", id: "attribution-table" });
      const head = el("tr");
      for (const h of ["rank", "score", "tokens", "source"]) head.append(el("th", {}, h));
      table.append(head);
      for (const s of attribution.sources) {
        const tr = el("tr");
        tr.append(el("td", { class: "num" }, String(s.rank)), el("td", { class: "num" }, fmt(s.score, 4)),
          el("td", { class: "num" }, `${s.tokens[0]}-${s.tokens[1]}`), el("td", {}, s.text));
        table.append(tr);
      }
      results.append(table);
    }
    for (const t of data.tables || []) {
      results.append(el("h3", {}, t.title));
      const box = el("div", { class: "value-box", "data-title": t.title });
      box.append(valueNode(t.value));
      results.append(box);
    }
    for (const figure of data.figures || []) {
      const box = el("div", { class: "figure" });
      box.append(el("div", { class: "caption" }, figure.title));
      box.append(el("img", { src: figure.src, alt: figure.title }));
      results.append(box);
    }
    if (results.childElementCount) $("results").hidden = false;
  }
