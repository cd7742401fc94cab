// sparsetrace report viewer: draws one layer/head of a trace as a query x key map.
// The data are the trace's own arrays (indices, quantised mass), never a T x T matrix. The map is
// one ImageData of (key units x query units) pixels scaled up, drawn once per layer/head/units
// change; hover and click map the mouse position to a cell by arithmetic, so there is no DOM
// element per cell. build_report pastes this file, viewer.units.js (the map's rows and columns:
// blocks, sentences or paragraphs), viewer.tables.js (run facts, results) and viewer.export.js
// (PNG) into one function scope and calls start().
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

  // rows: the selected query rows of the current units; anchor: where a shift-click range starts
  const state = { layer: 0, head: 0, units: "blocks", rows: [], anchor: null };
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

  /** int [n_q]: key blocks each query block of one layer and head keeps. */
  function keptCounts(layer, head) {
    const counts = new Array(NQ).fill(0);
    for (let i = 0; i < NQ; i++) {
      const start = ((layer * H + head) * NQ + i) * K;
      for (let k = 0; k < K; k++) if (indices[start + k] >= 0) counts[i] += 1;
    }
    return counts;
  }

  // ---- the map ---------------------------------------------------------------------------------
  const canvas = $("map");
  const context = canvas.getContext("2d");
  const image = document.createElement("canvas");
  const imageContext = image.getContext("2d");
  let grid = null; // the map's rows and columns in the current units (viewer.units.js)
  let cell = 1; // canvas pixels per cell
  let pixels = null;

  /** Size the map for the current units (about 768 px wide, whole pixels per cell) and label its axes. */
  function layout() {
    grid = unitGrid(state.units);
    const rows = grid.rows.length;
    const cols = grid.cols.length;
    cell = Math.max(1, Math.floor(768 / Math.max(rows, cols)));
    canvas.width = cols * cell;
    canvas.height = rows * cell;
    const display = Math.max(canvas.width, Math.min(768, 2 * canvas.width));
    canvas.style.width = display + "px";
    canvas.style.height = Math.round((display * rows) / cols) + "px";
    image.width = cols;
    image.height = rows;
    pixels = imageContext.createImageData(cols, rows);
    axes();
  }

  /** Every step-th unit gets a label, the step the smallest of 1, 2, 5, 10, 20, 50, ... that leaves `gap` px. */
  function tickStep(count, length, gap) {
    for (let scale = 1; ; scale *= 10) {
      for (const s of [1, 2, 5]) if (s * scale >= count || (s * scale * length) / count >= gap) return s * scale;
    }
  }

  /** Axis titles and tick labels (unit numbers; hover: their token range), placed in % of the map. */
  function axes() {
    $("x-title").textContent = `key ${grid.name} \u2192`;
    $("y-title").textContent = `query ${grid.name} \u2193`;
    const along = [["x-axis", grid.cols, "width", "left", 40, "key"], ["y-axis", grid.rows, "height", "top", 16, "query"]];
    for (const [id, spans, size, side, gap, role] of along) {
      const axis = $(id);
      axis.replaceChildren();
      const length = parseFloat(canvas.style[size]);
      axis.style[size] = length + "px";
      const step = tickStep(spans.length, length, gap);
      for (let n = 0; n < spans.length; n += step) {
        const [a, b] = spans[n];
        const tick = el("span", { class: "tick", "data-index": n, title: `${role} ${grid.name} ${n}: tokens ${a}-${b - 1}` },
          String(n));
        tick.style[side] = `${((n + 0.5) / spans.length) * 100}%`;
        axis.append(tick);
      }
    }
  }

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
    const cols = grid.cols.length;
    for (let r = 0; r < grid.rows.length; r++) {
      const last = grid.lastCol(r);
      for (let c = 0; c < cols; c++) {
        const o = (r * cols + c) * 4;
        const shade = c <= last ? 238 : 255; // the channels clamp at 255
        p[o] = shade; p[o + 1] = shade + 2; p[o + 2] = shade + 5; p[o + 3] = 255;
      }
      for (const x of grid.cells(state.layer, state.head, r)) {
        paint((r * cols + x.col) * 4, x.forced ? FORCED : SELECTED, 0.15 + 0.85 * Math.sqrt(x.value));
      }
    }
    imageContext.putImageData(pixels, 0, 0);
    context.imageSmoothingEnabled = false;
    context.drawImage(image, 0, 0, canvas.width, canvas.height);
    highlight();
    canvas.dataset.drawMs = (performance.now() - started).toFixed(3); // for the browser tests; not shown
    headFacts();
    keptStrip();
  }

  function highlight() {
    const size = Math.max(cell, 3);
    for (const r of state.rows) {
      context.strokeStyle = "rgba(214, 39, 40, 0.55)";
      context.lineWidth = 1;
      context.strokeRect(0.5, r * cell + 0.5, canvas.width - 1, Math.max(cell - 1, 1));
      context.strokeStyle = "#d62728";
      context.lineWidth = Math.min(3, Math.max(1, cell / 4));
      for (const x of grid.cells(state.layer, state.head, r)) {
        context.strokeRect(x.col * cell - (size - cell) / 2, r * cell - (size - cell) / 2, size, size);
      }
    }
  }

  /** The bars right of the map: each query block's kept blocks as a share of the key blocks it can read. */
  const strip = $("kept-strip");
  function keptStrip() {
    strip.hidden = $("strip-title").hidden = state.units !== "blocks";
    if (strip.hidden) return;
    const counts = keptCounts(state.layer, state.head);
    strip.dataset.counts = counts.join(",");
    strip.width = 24;
    strip.height = canvas.height;
    strip.style.height = canvas.style.height;
    const g = strip.getContext("2d");
    g.fillStyle = "#eef0f3";
    g.fillRect(0, 0, strip.width, strip.height);
    g.fillStyle = "#6b7487";
    for (let i = 0; i < NQ; i++) g.fillRect(0, i * cell, (strip.width * counts[i]) / (lastKey(i) + 1), cell);
  }

  /** [row, column] of the map cell under the mouse, or null. */
  function cellAt(event) {
    const rect = canvas.getBoundingClientRect();
    const c = Math.floor(((event.clientX - rect.left) / rect.width) * grid.cols.length);
    const r = Math.floor(((event.clientY - rect.top) / rect.height) * grid.rows.length);
    return r >= 0 && r < grid.rows.length && c >= 0 && c < grid.cols.length ? [r, c] : null;
  }

  /** The hover text of cell (r, c): both units with their token ranges, what the row reads there, their text. */
  function describe(r, c) {
    const [q0, q1] = grid.rows[r];
    const [k0, k1] = grid.cols[c];
    const x = grid.cells(state.layer, state.head, r).find((y) => y.col === c);
    const blocks = state.units === "blocks";
    const what = c > grid.lastCol(r) ? "in the future (masked)" : !x ? (blocks ? "not kept" : "not read")
      : blocks ? `kept (${x.forced ? "sink/local" : "selected"}), mass ${fmt(x.value, 3)}` : `share ${fmt(x.value, 3)}`;
    let text = `query ${grid.name} ${r} (tokens ${q0}-${q1 - 1}) -> key ${grid.name} ${c} (tokens ${k0}-${k1 - 1}): ${what}`;
    if (blocks) text += `\nthis row ${rowSummary(state.layer, state.head, r)}`;
    if (grid.rowText(r) !== null) text += `\nkey text: ${grid.colText(c)}\nquery text: ${grid.rowText(r)}`;
    return text;
  }

  const tooltip = $("tooltip");
  function showTooltip(event, text) {
    tooltip.textContent = text;
    const wrap = tooltip.parentElement.getBoundingClientRect();
    tooltip.style.left = event.clientX - wrap.left + 14 + "px";
    tooltip.style.top = event.clientY - wrap.top + 14 + "px";
    tooltip.hidden = false;
  }
  canvas.addEventListener("mousemove", (event) => {
    const at = cellAt(event);
    if (at) showTooltip(event, describe(at[0], at[1]));
    else tooltip.hidden = true;
  });
  strip.addEventListener("mousemove", (event) => {
    const rect = strip.getBoundingClientRect();
    const i = Math.min(NQ - 1, Math.floor(((event.clientY - rect.top) / rect.height) * NQ));
    showTooltip(event, `query block ${i} ${rowSummary(state.layer, state.head, i)} of the ${lastKey(i) + 1} it can read`);
  });
  for (const node of [canvas, strip]) node.addEventListener("mouseleave", () => { tooltip.hidden = true; });
  canvas.addEventListener("click", (event) => {
    const at = cellAt(event);
    if (!at) return;
    const r = at[0];
    if (event.shiftKey && state.anchor !== null) {
      const [a, b] = [Math.min(state.anchor, r), Math.max(state.anchor, r)];
      selectRows(Array.from({ length: b - a + 1 }, (_, n) => a + n), state.anchor);
    } else if (event.ctrlKey || event.metaKey) {
      selectRows(state.rows.includes(r) ? state.rows.filter((x) => x !== r) : [...state.rows, r], r);
    } else {
      selectRows([r], r);
    }
  });

  // ---- the panel of the selected query rows ------------------------------------------------------
  /** Select query rows of the current units (anchor: where a shift-click range starts) and list what they read. */
  function selectRows(rows, anchor) {
    state.rows = [...new Set(rows)].sort((a, b) => a - b);
    state.anchor = anchor ?? state.rows[0] ?? null;
    draw();
    reads();
  }

  /** What rows read together: per column the mean of the rows' values (0 where a row does not read it),
   * how many of them read it, and whether it is sink/local for each; highest mean first. */
  function together(layer, head, rows) {
    const sums = new Map();
    for (const r of rows) {
      for (const x of grid.cells(layer, head, r)) {
        const sum = sums.get(x.col) || { col: x.col, value: 0, readers: 0, forced: true };
        sum.value += x.value;
        sum.readers += 1;
        sum.forced = sum.forced && x.forced;
        sums.set(x.col, sum);
      }
    }
    return [...sums.values()].map((sum) => ({ ...sum, value: sum.value / rows.length }))
      .sort((a, b) => b.value - a.value || a.col - b.col);
  }

  /** Sorted numbers as ranges: "3-5, 9". */
  function ranges(numbers) {
    const parts = [];
    for (let n = 0; n < numbers.length; n++) {
      let m = n;
      while (m + 1 < numbers.length && numbers[m + 1] === numbers[m] + 1) m++;
      parts.push(m > n ? `${numbers[n]}-${numbers[m]}` : String(numbers[n]));
      n = m;
    }
    return parts.join(", ");
  }

  function reads() {
    const list = $("reads");
    const table = $("all-heads");
    const picked = state.rows;
    list.replaceChildren();
    table.replaceChildren();
    $("row-text").textContent = "";
    $("reads-hint").hidden = picked.length > 0;
    $("reads-title").hidden = $("all-heads-title").hidden = picked.length === 0;
    Object.assign(list.dataset, { layer: state.layer, head: state.head, units: state.units, rows: picked.join(",") });
    if (!picked.length) return;
    const name = grid.name;
    const measure = state.units === "blocks" ? "mass" : "share";
    const many = picked.length > 1;
    if (many) {
      $("reads-title").textContent = `Query ${name}s ${ranges(picked)} (${picked.length}), layer ${state.layer} ` +
        `head ${state.head}, read together (${measure}: the mean over these rows, 0 where a row does not read it):`;
    } else {
      const [q0, q1] = grid.rows[picked[0]];
      $("reads-title").textContent = `Query ${name} ${picked[0]} (tokens ${q0}-${q1 - 1}), layer ${state.layer} ` +
        `head ${state.head}` + (state.units === "blocks" ? ` ${rowSummary(state.layer, state.head, picked[0])}` : "") +
        "; it reads:";
      $("row-text").textContent = grid.rowText(picked[0]) ?? "";
    }
    for (const x of together(state.layer, state.head, picked)) {
      const [k0, k1] = grid.cols[x.col];
      const item = el("li", { "data-col": x.col, "data-value": x.value.toFixed(4), "data-readers": x.readers,
        class: x.forced ? "forced" : "selected" });
      item.append(el("b", {}, `${name} ${x.col} (tokens ${k0}-${k1 - 1}) ${measure} ${fmt(x.value, 3)}` +
        (many ? `, read by ${x.readers} of ${picked.length}` : "") + (x.forced ? " sink/local" : "")));
      if (grid.colText(x.col) !== null) item.append(document.createTextNode("\n" + grid.colText(x.col)));
      list.append(item);
    }
    $("all-heads-title").textContent = `Every head of this layer reads${many ? ", together" : ""}`;
    for (let h = 0; h < H; h++) {
      const tr = el("tr", { "data-head": h, class: h === state.head ? "current" : "" });
      tr.append(el("td", {}, `head ${h}`));
      const cellNode = el("td");
      for (const x of together(state.layer, h, picked)) {
        cellNode.append(el("span", { class: "chip" + (x.forced ? " forced" : ""), "data-col": x.col,
          title: `${measure} ${fmt(x.value, 3)}` + (grid.colText(x.col) !== null ? `: ${grid.colText(x.col)}` : "") },
        String(x.col)));
      }
      tr.append(cellNode);
      tr.addEventListener("click", () => { $("head").value = String(h); state.head = h; draw(); reads(); });
      table.append(tr);
    }
  }

  function headFacts() {
    const parts = [`layer ${state.layer}, head ${state.head}`];
    const counts = keptCounts(state.layer, state.head);
    parts.push(`its query blocks keep ${fmt(counts.reduce((a, b) => a + b, 0) / NQ, 1)} key blocks on average ` +
      `(at most ${Math.max(...counts)})`);
    const windows = S.sliding_windows;
    if (windows && windows[state.layer]) parts.push(`sliding window ${windows[state.layer]} tokens`);
    const f = data.fidelity;
    if (f && f.recall_per_head) {
      parts.push(`recall ${fmt(f.recall_per_head[state.layer][state.head], 3)} of the dense attention ` +
        `(oracle ${fmt(f.oracle_recall_per_head[state.layer][state.head], 3)})`);
    }
    $("head-facts").textContent = parts.join("; ");
  }

  // ---- pickers and start -------------------------------------------------------------------------
  function options(select, count, label) {
    for (let n = 0; n < count; n++) select.append(el("option", { value: n }, `${label} ${n}`));
  }

  /** Switch the map's units (the selection is dropped: its rows were of the other units). */
  function setUnits(units) {
    state.units = units;
    document.querySelector(`input[name="units"][value="${units}"]`).checked = true;
    $("legend-blocks").hidden = units !== "blocks";
    $("legend-units").hidden = units === "blocks";
    state.rows = [];
    state.anchor = null;
    layout();
    draw();
    reads();
  }

  function start() {
    options($("layer"), L, "layer");
    options($("head"), H, "head");
    $("layer").addEventListener("change", (e) => { state.layer = Number(e.target.value); draw(); reads(); });
    $("head").addEventListener("change", (e) => { state.head = Number(e.target.value); draw(); reads(); });
    for (const input of document.querySelectorAll('input[name="units"]')) {
      const available = input.value === "blocks" || Boolean(data.units && data.units[input.value]);
      input.disabled = !available;
      if (!available) input.parentElement.title = data.units_note || `no ${input.value}`;
      input.addEventListener("change", () => setUnits(input.value));
    }
    const niah = data.extra && data.extra.niah;
    if (niah && niah.route && niah.route.answer_blocks && niah.route.answer_blocks.length) {
      const answer = niah.route.answer_blocks[niah.route.answer_blocks.length - 1];
      const button = el("button", { id: "goto-answer", type: "button" }, `answer block ${answer}`);
      button.addEventListener("click", () => {
        if (state.units !== "blocks") setUnits("blocks");
        selectRows([answer], answer);
      });
      $("jumps").append(button);
    }
    $("export-png").addEventListener("click", exportPng);
    tables();
    setUnits("blocks");
    window.sparsetraceViewer = { state, row, grid: () => grid, draw, selectRows, setUnits };
  }
