"use strict";
// sparsetrace report viewer: draws one layer/head of a trace as a query-block x key-block map.
// The data are the trace's own arrays (indices, quantised mass), never a T x T matrix. The map is
// one ImageData of n_k x n_q pixels scaled up, drawn once per layer/head change; hover and click
// map the mouse position to a block by arithmetic, so there is no DOM element per cell.
(function () {
  const data = JSON.parse(document.getElementById("sparsetrace-data").textContent);
  const S = data.summary;
  const [L, H, NQ, K] = data.blocks.shape;
  const NK = S.key_blocks;
  const LEVELS = data.blocks.mass_levels;

  function bytes(base64) {
    const binary = atob(base64);
    const out = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
    return out;
  }
  // Typed arrays read the platform's byte order; every browser platform is little-endian, as the blob.
  const indexBytes = bytes(data.blocks.indices);
  const indices = data.blocks.index_type === "int32" ? new Int32Array(indexBytes.buffer) : new Int16Array(indexBytes.buffer);
  const mass = bytes(data.blocks.mass);
  // a coverage budget's estimated share of each row's attention in its kept blocks, else null
  const coverage = data.blocks.coverage ? bytes(data.blocks.coverage) : null;
  const rowCoverage = (layer, head, i) => (coverage ? coverage[(layer * H + head) * NQ + i] / LEVELS : null);
  function rowSummary(layer, head, i) {
    const kept = row(layer, head, i);
    const estimate = rowCoverage(layer, head, i);
    return `keeps ${kept.length} block${kept.length === 1 ? "" : "s"}` +
      (estimate === null ? "" : `, estimated coverage ${fmt(estimate, 3)} (target ${S.config.coverage})`);
  }

  const state = { layer: 0, head: 0, row: null };
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, text) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const fmt = (x, digits) => (typeof x === "number" ? x.toLocaleString("en-US", { maximumFractionDigits: digits ?? 3 }) : String(x));

  const lastKey = (i) => Math.floor((Math.min((i + 1) * S.block_q, S.tokens) - 1) / S.block_k);
  const isForced = (i, j) => j < S.sinks || j > lastKey(i) - S.local;
  const tokenRange = (b, size) => [b * size, Math.min((b + 1) * size, S.tokens) - 1];
  const queryText = (i) => (data.texts ? data.texts.query[i] : null);
  const keyText = (j) => (data.texts ? data.texts.key[j] : null);

  /** Kept key blocks of row i: [{block, mass, forced}], in the trace's order (ascending block). */
  function row(layer, head, i) {
    const start = ((layer * H + head) * NQ + i) * K;
    const out = [];
    for (let k = 0; k < K; k++) {
      const j = indices[start + k];
      if (j >= 0) out.push({ block: j, mass: mass[start + k] / LEVELS, forced: isForced(i, j) });
    }
    return out;
  }

  // ---- the map ---------------------------------------------------------------------------------
  const canvas = $("map");
  const cell = Math.max(1, Math.floor(768 / Math.max(NQ, NK)));
  canvas.width = NK * cell;
  canvas.height = NQ * cell;
  const display = Math.max(canvas.width, Math.min(768, 2 * canvas.width));
  canvas.style.width = display + "px";
  canvas.style.height = Math.round((display * NQ) / NK) + "px";
  const context = canvas.getContext("2d");
  const image = document.createElement("canvas");
  image.width = NK;
  image.height = NQ;
  const imageContext = image.getContext("2d");
  const pixels = imageContext.createImageData(NK, NQ);

  const SELECTED = [43, 94, 167];
  const FORCED = [199, 125, 36];
  function paint(offset, rgb, t) {
    // white -> rgb by t in [0, 1]
    pixels.data[offset] = 255 + (rgb[0] - 255) * t;
    pixels.data[offset + 1] = 255 + (rgb[1] - 255) * t;
    pixels.data[offset + 2] = 255 + (rgb[2] - 255) * t;
    pixels.data[offset + 3] = 255;
  }

  function draw() {
    const started = performance.now();
    const p = pixels.data;
    for (let i = 0; i < NQ; i++) {
      const last = lastKey(i);
      for (let j = 0; j < NK; j++) {
        const o = (i * NK + j) * 4;
        const shade = j <= last ? 238 : 255;
        p[o] = shade; p[o + 1] = shade + 2; p[o + 2] = shade + 5 > 255 ? 255 : shade + 5; p[o + 3] = 255;
      }
      for (const kept of row(state.layer, state.head, i)) {
        paint((i * NK + kept.block) * 4, kept.forced ? FORCED : SELECTED, 0.15 + 0.85 * Math.sqrt(kept.mass));
      }
    }
    imageContext.putImageData(pixels, 0, 0);
    context.imageSmoothingEnabled = false;
    context.drawImage(image, 0, 0, canvas.width, canvas.height);
    if (state.row !== null) highlight();
    const ms = performance.now() - started;
    $("draw-ms").textContent = ms.toFixed(1);
    $("draw-ms").dataset.ms = ms.toFixed(3);
    headFacts();
  }

  function highlight() {
    const i = state.row;
    context.strokeStyle = "rgba(214, 39, 40, 0.55)";
    context.lineWidth = 1;
    context.strokeRect(0.5, i * cell + 0.5, canvas.width - 1, Math.max(cell, 1) - 1 || 1);
    context.strokeStyle = "#d62728";
    context.lineWidth = Math.max(1, cell / 4);
    for (const kept of row(state.layer, state.head, i)) {
      const size = Math.max(cell, 3);
      context.strokeRect(kept.block * cell - (size - cell) / 2, i * cell - (size - cell) / 2, size, size);
    }
  }

  function blockAt(event) {
    const rect = canvas.getBoundingClientRect();
    const j = Math.floor(((event.clientX - rect.left) / rect.width) * NK);
    const i = Math.floor(((event.clientY - rect.top) / rect.height) * NQ);
    return i >= 0 && i < NQ && j >= 0 && j < NK ? [i, j] : null;
  }

  const tooltip = $("tooltip");
  canvas.addEventListener("mousemove", (event) => {
    const at = blockAt(event);
    if (!at) { tooltip.hidden = true; return; }
    const [i, j] = at;
    const [q0, q1] = tokenRange(i, S.block_q);
    const [k0, k1] = tokenRange(j, S.block_k);
    const kept = row(state.layer, state.head, i).find((b) => b.block === j);
    const what = j > lastKey(i) ? "in the future (masked)" : kept
      ? `kept (${kept.forced ? "sink/local" : "selected"}), mass ${fmt(kept.mass, 3)}` : "not kept";
    let text = `query block ${i} (tokens ${q0}-${q1}) -> key block ${j} (tokens ${k0}-${k1}): ${what}` +
      `\nthis row ${rowSummary(state.layer, state.head, i)}`;
    if (data.texts) text += `\nkey text: ${keyText(j)}\nquery text: ${queryText(i)}`;
    tooltip.textContent = text;
    const wrap = canvas.parentElement.getBoundingClientRect();
    tooltip.style.left = event.clientX - wrap.left + 14 + "px";
    tooltip.style.top = event.clientY - wrap.top + 14 + "px";
    tooltip.hidden = false;
  });
  canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });
  canvas.addEventListener("click", (event) => {
    const at = blockAt(event);
    if (at) selectRow(at[0]);
  });

  // ---- the panel of a clicked query block --------------------------------------------------------
  function selectRow(i) {
    state.row = i;
    draw();
    reads();
  }

  function reads() {
    const list = $("reads");
    const table = $("all-heads");
    list.replaceChildren();
    table.replaceChildren();
    if (state.row === null) return;
    const i = state.row;
    const [q0, q1] = tokenRange(i, S.block_q);
    $("reads-title").textContent = `Query block ${i} (tokens ${q0}-${q1}), layer ${state.layer} head ${state.head} ` +
      `${rowSummary(state.layer, state.head, i)}; it reads:`;
    $("row-text").textContent = data.texts ? queryText(i) : "";
    list.dataset.layer = state.layer;
    list.dataset.head = state.head;
    list.dataset.row = i;
    const kept = row(state.layer, state.head, i).sort((a, b) => b.mass - a.mass);
    for (const b of kept) {
      const [k0, k1] = tokenRange(b.block, S.block_k);
      const item = el("li", { "data-block": b.block, "data-mass": b.mass.toFixed(4), class: b.forced ? "forced" : "selected" });
      item.append(el("b", {}, `block ${b.block} (tokens ${k0}-${k1}) mass ${fmt(b.mass, 3)}${b.forced ? " sink/local" : ""}`));
      if (data.texts) item.append(document.createTextNode("\n" + keyText(b.block)));
      list.append(item);
    }
    for (let h = 0; h < H; h++) {
      const tr = el("tr", { "data-head": h, class: h === state.head ? "current" : "" });
      tr.append(el("td", {}, `head ${h}`));
      const cellNode = el("td");
      for (const b of row(state.layer, h, i).sort((a, c) => c.mass - a.mass)) {
        const chip = el("span", { class: "chip" + (b.forced ? " forced" : ""), "data-block": b.block,
          title: `mass ${fmt(b.mass, 3)}` + (data.texts ? `: ${keyText(b.block)}` : "") }, String(b.block));
        cellNode.append(chip);
      }
      tr.append(cellNode);
      tr.addEventListener("click", () => { $("head").value = String(h); state.head = h; draw(); reads(); });
      table.append(tr);
    }
  }

  function headFacts() {
    const parts = [`layer ${state.layer}, head ${state.head}`];
    const windows = S.sliding_windows;
    if (windows && windows[state.layer]) parts.push(`sliding window ${windows[state.layer]} tokens`);
    const f = data.fidelity;
    if (f && f.recall_per_head) {
      parts.push(`recall ${fmt(f.recall_per_head[state.layer][state.head], 3)} of the dense attention ` +
        `(oracle ${fmt(f.oracle_recall_per_head[state.layer][state.head], 3)})`);
    }
    $("head-facts").textContent = parts.join("; ");
  }

  // ---- pickers -----------------------------------------------------------------------------------
  function options(select, count, label) {
    for (let n = 0; n < count; n++) select.append(el("option", { value: n }, `${label} ${n}`));
  }
  options($("layer"), L, "layer");
  options($("head"), H, "head");
  $("layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); draw(); reads(); });
  $("head").addEventListener("change", (e) => { state.head = Number(e.target.value); draw(); reads(); });
  const niah = data.extra && data.extra.niah;
  if (niah && niah.route && niah.route.answer_blocks && niah.route.answer_blocks.length) {
    const answer = niah.route.answer_blocks[niah.route.answer_blocks.length - 1];
    const button = el("button", { id: "goto-answer", type: "button" }, `answer block ${answer}`);
    button.addEventListener("click", () => selectRow(answer));
    $("jumps").append(button);
  }

  // ---- tables: summary, fidelity, results ------------------------------------------------------
  function facts(table, rows) {
    for (const [name, value] of rows) {
      const tr = el("tr");
      tr.append(el("td", {}, name), el("td", {}, value));
      table.append(tr);
    }
  }
  const st = S.stats;
  facts($("summary-table"), [
    ["model", S.model || "?"],
    ["tokens", `${fmt(S.tokens)}   (${NQ} query blocks of ${S.block_q}, ${NK} key blocks of ${S.block_k})`],
    ["layers x heads", `${L} x ${H}`],
    ["estimator", Object.entries(S.config).map(([k, v]) => `${k}=${v}`).join(", ")],
    ["kept blocks", `${fmt(st.kept_blocks)} (${fmt(st.selected_blocks)} selected + ${fmt(st.forced_blocks)} sink/local)`],
    ["sparsity", `${fmt(100 * st.sparsity, 1)}% of causal token pairs pruned (block grid ${fmt(100 * st.block_sparsity, 1)}%)`],
    ["compression", `${fmt(st.compression, 0)}x (T^2 / kept blocks per head and layer)`],
    ["size", `trace ${fmt(st.trace_bytes / 1e6, 2)} MB vs dense fp16 attention patterns ${fmt(st.dense_pattern_bytes / 1e9, 2)} GB`],
  ]);
  if (data.text_note) { $("text-note").textContent = data.text_note; $("text-note").hidden = false; }

  function grid(headers, rows) {
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
      body.append(grid(["layer", "recall", "oracle", "ratio"], f.recall.map((r, l) => [l, r, f.oracle_recall[l], f.recall_ratio[l]])));
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
    results.append(el("pre", { class: "json" }, JSON.stringify(t.value, null, 1)));
  }
  for (const figure of data.figures || []) {
    const box = el("div", { class: "figure" });
    box.append(el("div", { class: "caption" }, figure.title));
    box.append(el("img", { src: figure.src, alt: figure.title }));
    results.append(box);
  }
  if (results.childElementCount) $("results").hidden = false;

  draw();
  window.sparsetraceViewer = { state, row, cell, nq: NQ, nk: NK, draw, selectRow };
})();
