// The map's rows and columns: query and key units as token spans [start, end). "blocks" are the
// trace's own blocks, and a cell is a kept entry with its mass. "sentences" and "paragraphs" are
// analysis/segments.py's units (computed at build time: data.units) and aggregate the blocks: a kept
// block's mass is spread evenly over the keys of that block a query token can see (causal; the
// trace has no finer resolution), so query unit U reads key unit V with
//
//   share(U, V) = mean over tokens t of U of  sum over key blocks j kept by t's query block i of
//                 mass(i, j) x |V ∩ j ∩ [0, t]| / |j ∩ [0, t]|
//
// Tokens in no unit (chat markup, whitespace between paragraphs) are in no row and no column.
// Part of the viewer's function scope (viewer.js): uses its data, S, row, lastKey and texts.

  const UNIT_NAMES = { blocks: "block", sentences: "sentence", paragraphs: "paragraph" };
  const grids = {};

  /** The grid of `kind` ("blocks", "sentences", "paragraphs"): {name, rows, cols, cells(layer, head, r),
   * lastCol(r), rowText(r), colText(c)}; cells are [{col, value, forced}] in column order. */
  function unitGrid(kind) {
    if (!grids[kind]) grids[kind] = kind === "blocks" ? blockGrid() : aggregateGrid(kind);
    return grids[kind];
  }

  /** Token spans [start, end) of blocks of `size` tokens. */
  function blockSpans(size) {
    return Array.from({ length: Math.ceil(S.tokens / size) }, (_, b) => [b * size, Math.min((b + 1) * size, S.tokens)]);
  }

  function blockGrid() {
    return {
      name: UNIT_NAMES.blocks,
      rows: blockSpans(S.block_q),
      cols: blockSpans(S.block_k),
      cells: (layer, head, i) => row(layer, head, i).map((b) => ({ col: b.block, value: b.mass, forced: b.forced })),
      lastCol: lastKey,
      rowText: queryText,
      colText: keyText,
    };
  }

  /** Index of the last span starting at or before token t (-1: none). */
  function spanBefore(spans, t) {
    let [lo, hi] = [0, spans.length];
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (spans[mid][0] <= t) lo = mid + 1;
      else hi = mid;
    }
    return lo - 1;
  }

  function aggregateGrid(kind) {
    const spans = data.units[kind].tokens;
    const texts = data.units[kind].texts;
    // per key block j: the units it overlaps, [unit, first token, end token] of the overlap
    const keyUnits = blockSpans(S.block_k).map(([a, b]) => {
      const out = [];
      for (let v = Math.max(0, spanBefore(spans, a)); v < spans.length && spans[v][0] < b; v++) {
        const [lo, hi] = [Math.max(a, spans[v][0]), Math.min(b, spans[v][1])];
        if (hi > lo) out.push([v, lo, hi]);
      }
      return out;
    });

    function cells(layer, head, u) {
      const [start, end] = spans[u];
      const share = new Map();
      const add = (v, x) => share.set(v, (share.get(v) || 0) + x);
      for (let i = Math.floor(start / S.block_q); i * S.block_q < end; i++) {
        const [a, b] = [Math.max(start, i * S.block_q), Math.min(end, (i + 1) * S.block_q)]; // U's tokens in block i
        for (const kept of row(layer, head, i)) {
          const [j0, j1] = [kept.block * S.block_k, Math.min((kept.block + 1) * S.block_k, S.tokens)];
          const whole = b - Math.max(a, j1 - 1); // tokens t >= j1 - 1 see all of block j
          if (whole > 0) for (const [v, lo, hi] of keyUnits[kept.block]) add(v, (whole * kept.mass * (hi - lo)) / (j1 - j0));
          for (let t = Math.max(a, j0); t < Math.min(b, j1 - 1); t++) { // tokens inside block j see keys j0 .. t
            for (const [v, lo, hi] of keyUnits[kept.block]) {
              if (lo <= t) add(v, (kept.mass * (Math.min(hi, t + 1) - lo)) / (t + 1 - j0));
            }
          }
        }
      }
      return [...share].map(([col, x]) => ({ col, value: x / (end - start), forced: false })).sort((p, q) => p.col - q.col);
    }

    return {
      name: UNIT_NAMES[kind],
      rows: spans,
      cols: spans,
      cells,
      lastCol: (u) => spanBefore(spans, spans[u][1] - 1),
      rowText: (u) => texts[u],
      colText: (v) => texts[v],
    };
  }
