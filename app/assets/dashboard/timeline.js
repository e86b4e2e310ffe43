/* The memory timeline, drawn by hand as SVG (no charting library: the page works offline).
 *
 * Samples are {t (s), models: {name: bytes}, others, free, total}; markers are reclaim events
 * {t, bytes, model, reason}. Areas are stacked from the bottom: each model, then other
 * applications, then free memory. A marker is a dashed line with the bytes given back.
 */
"use strict";

const Timeline = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const W = 960, H = 300, TOP = 22, LEFT = 54;
  const PALETTE = ["#20b2aa", "#4f8fe8", "#b27ae8", "#e86fa3", "#7bc96f", "#e8c25a"];
  const OTHERS = "#6c7480", FREE = "#22313d";

  function formatBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = Math.abs(n), i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (n < 0 ? "-" : "") + (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  }

  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function colorOf(names, name) { return PALETTE[names.indexOf(name) % PALETTE.length]; }

  /* Layers bottom to top: [{key, color, values: [bytes per sample]}]. */
  function layers(samples, names) {
    const out = names.map(name => ({ key: name, color: colorOf(names, name),
                                     values: samples.map(s => s.models[name] || 0) }));
    out.push({ key: "other applications", color: OTHERS, values: samples.map(s => s.others || 0) });
    out.push({ key: "free", color: FREE, values: samples.map(s => s.free || 0) });
    return out;
  }

  function render(svg, samples, markers, opts) {
    const now = opts.now, span = opts.windowS;
    const names = opts.names;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const x = t => LEFT + (t - (now - span)) / span * (W - LEFT);
    const shown = samples.filter(s => s.t >= now - span - 5);
    const modelPeak = Math.max(1, ...shown.map(s => names.reduce((a, n) => a + (s.models[n] || 0), 0)));
    const total = Math.max(1, ...shown.map(s => s.total || 0));
    // "auto": models that hold a sliver of the device get a zoomed scale (others and free then
    // run off the top), so a 100 MiB model on a 24 GiB device is still seen to rise and fall.
    const zoom = opts.scale === "models" || (opts.scale !== "device" && modelPeak < total * 0.1);
    const top = zoom ? Math.min(total, modelPeak * 2) : total;
    const y = b => H - (Math.min(b, top) / top) * (H - TOP);
    for (let i = 0; i <= 4; i++) {
      const b = top * i / 4;
      svg.appendChild(el("line", { class: "axis", x1: LEFT, x2: W, y1: y(b), y2: y(b) }));
      svg.appendChild(el("text", { class: "label", x: 4, y: y(b) - 2 }, formatBytes(b)));
    }
    if (shown.length > 0) {
      const stack = layers(shown, names), base = shown.map(() => 0);
      for (const layer of stack) {
        const upper = base.map((b, i) => b + layer.values[i]);
        const pts = shown.map((s, i) => `${x(s.t).toFixed(1)},${y(upper[i]).toFixed(1)}`)
          .concat(shown.map((s, i) => `${x(s.t).toFixed(1)},${y(base[i]).toFixed(1)}`).reverse());
        svg.appendChild(el("polygon", { points: pts.join(" "), fill: layer.color, class: "area",
                                        "data-key": layer.key }));
        upper.forEach((v, i) => { base[i] = v; });
      }
    }
    svg.appendChild(el("text", { class: "label", x: W - 4, y: H - 4, "text-anchor": "end" },
                       zoom ? "scale: models (double-click: whole device)" : "scale: whole device"));
    for (const m of markers.filter(m => m.t >= now - span)) {
      const g = el("g", { class: "reclaim-marker", "data-bytes": m.bytes, "data-model": m.model });
      g.appendChild(el("line", { x1: x(m.t), x2: x(m.t), y1: TOP - 4, y2: H }));
      const label = "\u25BC " + formatBytes(m.bytes) + (m.model && m.model !== "*" ? " " + m.model : "");
      g.appendChild(el("text", { x: Math.min(x(m.t) + 4, W - 150), y: 14 }, label));
      g.appendChild(el("title", {}, `gave back ${formatBytes(m.bytes)} (${m.reason || "reclaim"})`));
      svg.appendChild(g);
    }
  }

  function legend(node, names) {
    node.textContent = "";
    const items = names.map(n => [n, colorOf(names, n)]).concat([["other applications", OTHERS], ["free", FREE]]);
    for (const [label, color] of items) {
      const span = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = color;
      span.append(swatch, label);
      node.appendChild(span);
    }
  }

  /* A new marker, or one merged with the last when they are parts of one reclaim (the broker's
   * steps arrive first, then the manual reclaim with their total). */
  function addMarker(markers, marker, isTotal) {
    const last = markers[markers.length - 1];
    if (last && Math.abs(marker.t - last.t) < 2) {
      if (isTotal) { last.bytes = marker.bytes; last.model = marker.model; last.reason = marker.reason; }
      else if (!last.isTotal) last.bytes += marker.bytes;
      last.isTotal = last.isTotal || isTotal;
      return;
    }
    markers.push({ ...marker, isTotal });
  }

  return { render, legend, formatBytes, addMarker };
})();
