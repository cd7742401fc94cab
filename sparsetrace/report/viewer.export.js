// "save map as PNG": the map as shown (layer, head, units, selection) with its title and axis
// labels, drawn onto one canvas and offered as a data:image/png download (nothing leaves the page).
// Part of the viewer's function scope (viewer.js): uses its canvas, grid and state.

  function exportPng() {
    const [width, height] = [parseFloat(canvas.style.width), parseFloat(canvas.style.height)];
    const [left, top, pad] = [56, 52, 12];
    const out = document.createElement("canvas");
    out.width = left + width + pad;
    out.height = top + height + pad;
    const g = out.getContext("2d");
    g.fillStyle = "#fff";
    g.fillRect(0, 0, out.width, out.height);
    g.fillStyle = "#1d2330";
    g.font = "13px sans-serif";
    g.fillText(`layer ${state.layer}, head ${state.head}: query ${grid.name} (down) x key ${grid.name} (across)`, 4, 16);
    g.font = "11px sans-serif";
    g.fillStyle = "#5b6475";
    g.textAlign = "center";
    for (const tick of $("x-axis").children) {
      g.fillText(tick.textContent, left + ((Number(tick.dataset.index) + 0.5) / grid.cols.length) * width, top - 6);
    }
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (const tick of $("y-axis").children) {
      g.fillText(tick.textContent, left - 6, top + ((Number(tick.dataset.index) + 0.5) / grid.rows.length) * height);
    }
    g.imageSmoothingEnabled = false;
    g.drawImage(canvas, left, top, width, height);
    const link = $("export-link");
    link.href = out.toDataURL("image/png");
    link.download = `sparsetrace-layer${state.layer}-head${state.head}-${state.units}.png`;
    link.click();
  }
