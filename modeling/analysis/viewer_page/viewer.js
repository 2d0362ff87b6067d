"use strict";
(function () {
const $ = (id) => document.getElementById(id);
function b64(id) {
  const s = atob($(id).textContent.trim()), a = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
  return a;
}
const T0 = performance.now();
const D = JSON.parse($("viewer-data").textContent);
const U8 = b64("viewer-u8"), F32 = new Float32Array(b64("viewer-f32").buffer);
window.viewerTimings = {script: T0, decoded: performance.now()};
const LUT = new Uint8Array(768);
{ const h = $("viewer-lut").textContent.trim(); for (let i = 0; i < 768; i++) LUT[i] = parseInt(h.substr(2 * i, 2), 16); }
const W = D.image_size[0], H = D.image_size[1], DW = D.display[0], DH = D.display[1];
const gs = D.grid_side / Math.max(DW, DH);
const GW = Math.max(1, Math.round(DW * Math.min(1, gs))), GH = Math.max(1, Math.round(DH * Math.min(1, gs)));
const N = D.n_image_tokens, T = D.tokens.length;
const S = {t: 0, click: null};
const ov = $("overlay"), photo = $("photo"), HAS_IMAGE = photo.tagName === "IMG";
const orig = photo.cloneNode(true); orig.id = "photo-orig"; $("orig").appendChild(orig);
const BASE = Math.max(800, Math.min(DW, 1200));  // the image's width at zoom 1 (css px), less when the window is narrower
function layout() {  // pane size from the window, the zoom and the side-by-side toggle; the overlay at screen resolution
  const z = +$("zoom").value, sbs = $("sidebyside").checked, avail = $("view").clientWidth || BASE;
  $("orig").style.display = sbs ? "" : "none";
  const w = Math.max(50, Math.floor(Math.min(BASE, sbs ? (avail - 8) / 2 : avail) * z)), h = Math.round(w * DH / DW);
  for (const p of [$("orig"), $("stage")]) { p.style.width = w + "px"; p.style.height = h + "px"; }
  const dpr = window.devicePixelRatio || 1;
  ov.width = Math.round(w * dpr); ov.height = Math.round(h * dpr);
}
layout();
const grid = document.createElement("canvas"); grid.width = GW; grid.height = GH;

function opt(sel, value, text, title) {
  const o = document.createElement("option"); o.value = value; o.textContent = text;
  if (title) o.title = title; sel.appendChild(o); return o;
}
const KIND_NAMES = {llm: "LLM \u2192 image", resampler: "resampler query", vision: "SigLIP patch"};
opt($("kind"), "llm", KIND_NAMES.llm);
opt($("kind"), "resampler", KIND_NAMES.resampler);
if (D.vision.layers.length) opt($("kind"), "vision", KIND_NAMES.vision);
for (const k of Object.keys(D.extras)) opt($("kind"), "x:" + k, k);
for (const l of D.layers) opt($("layer"), l, /^\d+$/.test(l) ? "layer " + l : l);
for (const h of D.heads) opt($("head"), h, /^\d+$/.test(h) ? "head " + h : h);
for (const v of D.vision.layers) opt($("vlayer"), v.layer, "layer " + v.layer);
D.slices.forEach((s, i) => opt($("slice"), i, s.kind === "source" ? "overview" : "slice " + s.index +
  (s.grid_pos ? " (row " + s.grid_pos[0] + ", col " + s.grid_pos[1] + ")" : "")));
$("query").max = N - 1;
$("tokdesc").textContent = "(" + D.token_desc + ")";

const toks = $("tokens");
D.tokens.forEach((t, i) => {
  const s = document.createElement("span"); s.className = "token"; s.dataset.t = i;
  s.textContent = t.text === "" ? "\u2205" : t.text; s.title = rowName(t);
  s.addEventListener("click", () => { S.t = i; draw(); }); toks.appendChild(s); toks.appendChild(document.createTextNode(" "));
});

function rowName(t) {  // the API's convention: query row N of the attention matrix, which predicts the token at N + 1
  return "row " + t.row + (t.pos === t.row ? " (its own token " : " (predicts token ") + JSON.stringify(t.text) + ")";
}
function block(l, h) { return D.blocks[l + "|" + h]; }
function refreshOptions() {
  const l = $("layer").value;
  for (const o of $("layer").options) o.disabled = !D.heads.some((h) => block(o.value, h));
  for (const o of $("head").options) o.disabled = !block(l, o.value);
  if (!block(l, $("head").value)) { const ok = D.heads.find((h) => block(l, h)); if (ok) $("head").value = ok; }
  const k = $("kind").value;
  $("vlayer").disabled = k !== "vision"; $("slice").disabled = k !== "vision";
  $("query").disabled = k !== "resampler" && k !== "vision";
  $("nosinks").disabled = !D.sinks || !D.sinks.length || k.startsWith("x:");
  $("thruvision").disabled = !D.through_vision || (k !== "llm" && k !== "resampler");
}
function thru() {  // the LLM and resampler kinds through the SigLIP rollout
  const k = $("kind").value;
  return !!D.through_vision && $("thruvision").checked && (k === "llm" || k === "resampler");
}
function rowTotal(sh) {  // a row's total; 1 (a softmax row) when the record lacks its text/special columns
  return sh[1] === null || sh[2] === null ? 1 : sh[0] + sh[1] + sh[2];
}
function sinkScale(sh) {  // exclude_sinks: the rest of the row rescaled to the row's total
  if (!$("nosinks").checked || sh.length < 4) return 1;
  const tot = rowTotal(sh), rest = tot - sh[3];
  return rest > 1e-12 ? tot / rest : 0;
}
function llmVec(t) {  // the token's attention on the image tokens
  const b = block($("layer").value, $("head").value); if (!b) return null;
  const v = new Float32Array(N), sc = F32[b.f + t] / 255 * sinkScale(b.sh[t]), o = b.u + t * N;
  for (let i = 0; i < N; i++) v[i] = U8[o + i] * sc;
  if ($("nosinks").checked) for (const i of D.sink_image) v[i] = 0;
  return v;
}
function sliceMap(s, v, tv) {  // [h*w] patch masses of slice s for image-token weights v (tv: through SigLIP)
  const sl = D.slices[s], P = sl.tgt[0] * sl.tgt[1], m = new Float32Array(P), e = tv ? D.through_vision[s] : sl;
  for (let q = 0; q < sl.nq; q++) {
    const wq = v[sl.n0 + q] * F32[e.f + q] / 255; if (!wq) continue;
    const o = e.u + q * P;
    for (let p = 0; p < P; p++) m[p] += wq * U8[o + p];
  }
  return m;
}
function axisW(nOut, len, lo, hi, n) {  // per output cell: [[k, share of cell k's mass], ...]
  const step = (hi - lo) / n, px = len / nOut, out = [];
  for (let i = 0; i < nOut; i++) {
    const a = i * px, b = a + px, row = [];
    const k0 = Math.max(0, Math.floor((a - lo) / step)), k1 = Math.min(n - 1, Math.ceil((b - lo) / step));
    for (let k = k0; k <= k1; k++) {
      const c0 = lo + k * step, ov_ = Math.min(b, c0 + step) - Math.max(a, c0);
      if (ov_ > 0) row.push(k, ov_ / step);
    }
    out.push(row);
  }
  return out;
}
const AX = D.slices.map((sl) => ({
  y: axisW(GH, H, sl.box[1], sl.box[3], sl.tgt[0]), x: axisW(GW, W, sl.box[0], sl.box[2], sl.tgt[1])}));
function place(out, s, m) {  // add slice s's patch masses m [h*w] onto the grid (area weighting)
  const sl = D.slices[s], h = sl.tgt[0], w = sl.tgt[1], ax = AX[s], tmp = new Float32Array(w);
  for (let y = 0; y < GH; y++) {
    const ry = ax.y[y]; if (!ry.length) continue;
    tmp.fill(0);
    for (let j = 0; j < ry.length; j += 2) { const r = ry[j], f = ry[j + 1];
      for (let c = 0; c < w; c++) tmp[c] += f * m[r * w + c]; }
    for (let x = 0; x < GW; x++) { const rx = ax.x[x]; let acc = 0;
      for (let j = 0; j < rx.length; j += 2) acc += rx[j + 1] * tmp[rx[j]];
      out[y * GW + x] += acc; }
  }
}
function argmax(a) { let b = 0; for (let i = 1; i < a.length; i++) if (a[i] > a[b]) b = i; return b; }
function sliceOf(j) { return D.slices.findIndex((s) => j >= s.n0 && j < s.n0 + s.nq); }
function pct(x) { return x === null ? "not captured" : (100 * x).toFixed(1) + "%"; }

function compute() {  // -> {map: Float32Array(GW*GH) or null, lo, hi, info, mark}
  const k = $("kind").value, t = S.t, tok = D.tokens[t];
  const head = rowName(tok) + "\n";
  if (k.startsWith("x:")) {
    const name = k.slice(2), e = D.extras[name][String(t)];
    if (!e) return {map: null, info: head + "no " + name + " map for this token"};
    const eh = e.shape[0], ew = e.shape[1], lo = F32[e.f], hi = F32[e.f + 1], out = new Float32Array(GW * GH);
    for (let y = 0; y < GH; y++) for (let x = 0; x < GW; x++)
      out[y * GW + x] = lo + (hi - lo) * U8[e.u + Math.min(eh - 1, Math.floor(y * eh / GH)) * ew
                                            + Math.min(ew - 1, Math.floor(x * ew / GW))] / 255;
    return {map: out, lo: lo, hi: hi, info: head + name + " map (" + ew + " x " + eh + " values), range " +
            lo.toPrecision(3) + " .. " + hi.toPrecision(3)};
  }
  const v = llmVec(t);
  if (!v) return {map: null, info: head + "this (layer, head) map is not embedded (see the notes)"};
  const out = new Float32Array(GW * GH), tv = thru();
  const TV = " and the SigLIP rollout (all vision layers, head mean, residual 0.5)";
  if (k === "llm") {
    let tot = 0; for (let i = 0; i < N; i++) tot += v[i];
    for (let s = 0; s < D.slices.length; s++) place(out, s, sliceMap(s, v, tv));
    return {map: out, info: head + "LLM attention on the image tokens, through the resampler" + (tv ? TV : "") +
            " onto pixels (mass " + tot.toPrecision(3) + ", overview + slices added)" +
            (tv ? "\nthrough SigLIP: where the patches the resampler read drew their content from" : "")};
  }
  let j = +$("query").value; const most = !(j >= 0 && j < N);
  if (most) j = argmax(v);
  const s = sliceOf(j), sl = D.slices[s], q = j - sl.n0, P = sl.tgt[0] * sl.tgt[1];
  const e = new Float32Array(N); e[j] = 1;
  const where = (most ? "image token -1 = the one this token attended to most: " : "") + "image token " + j + " = " + (sl.kind === "source" ? "overview" : "slice " + sl.index) +
    ", query " + q + " (the token gave it " + pct(v[j]) + ")";
  if (k === "resampler") {
    place(out, s, sliceMap(s, e, tv));
    return {map: out, q: j, info: head + "resampler query map" + (tv ? " through SigLIP (composed with" + TV.slice(4) +
            "; where the query's content came from)" : "") + ": " + where, slice: s, clip: sl.box};
  }
  const m = sliceMap(s, e, false);
  // vision: the query patch is the clicked one (in the chosen slice) or the peak of the query map
  const vs = +$("slice").value, vsl = D.slices[vs], h = vsl.tgt[0], w = vsl.tgt[1];
  let pr, pc;
  if (S.click && S.click.s === vs) { pr = S.click.r; pc = S.click.c; }
  else { const mm = vs === s ? m : sliceMap(vs, v); const p = argmax(mm); pr = Math.floor(p / w); pc = p % w; }
  const V = D.vision.layers.find((x) => String(x.layer) === $("vlayer").value) || D.vision.layers[0];
  const f = D.vision.pool, bw = Math.ceil(w / f), row = Math.floor(pr / f) * bw + Math.floor(pc / f);
  const e2 = V.slices[vs], Pv = h * w, sc = F32[e2.f + row] / 255, mv = new Float32Array(Pv);
  for (let p = 0; p < Pv; p++) mv[p] = U8[e2.u + row * Pv + p] * sc;
  place(out, vs, mv);
  const bx = vsl.box, cw = (bx[2] - bx[0]) / w, ch = (bx[3] - bx[1]) / h;
  const r0 = Math.floor(pr / f) * f, c0 = Math.floor(pc / f) * f;
  return {map: out, slice: vs, clip: vsl.box, patch: [pr, pc], info: head + "SigLIP layer " + V.layer + ", " + (vsl.kind === "source" ? "overview" :
          "slice " + vsl.index) + ": attention of patch (" + pr + ", " + pc + ")" + (f > 1 ? " pooled " + f + "x" + f : "") +
          " over the slice's patches (head mean; click the image to pick a patch)",
          mark: [bx[0] + c0 * cw, bx[1] + r0 * ch, Math.min(f, w - c0) * cw, Math.min(f, h - r0) * ch]};
}

const tv = $("tokview");
if (D.text_cols) D.text_cols.forEach((c, i) => {  // the token view: one span per text / special column
  const s = document.createElement("span"); s.className = "tv"; s.dataset.i = i;
  s.textContent = c.text === "" ? "\u2205" : c.text.replace(/\n/g, "\u21b5");  // a newline as a visible mark
  s.addEventListener("click", () => {  // like the image: a click picks that token's row when it is shown
    const t = D.tokens.findIndex((x) => x.row === c.pos);
    if (t >= 0) { S.t = t; draw(); } else $("tokviewdesc").textContent = "(" + s.title + "; its own row is not shown)";
  });
  tv.appendChild(s);
});
function tokenRow(t) {  // the token's attention over D.text_cols (null when not embedded)
  const b = block($("layer").value, $("head").value); if (!D.text_cols || !b || !b.x) return null;
  const K = D.text_cols.length, sc = F32[b.x.f + t] / 255, o = b.x.u + t * K, v = new Float32Array(K);
  for (let i = 0; i < K; i++) v[i] = U8[o + i] * sc;
  return v;
}
function drawTokenView() {  // the selected token's row over the text tokens, as background colour
  if (!D.text_cols) { $("tokviewdesc").textContent = "(not available: the record lacks the LLM's text columns)"; return; }
  const b = block($("layer").value, $("head").value), tok = D.tokens[S.t];
  if (!b || !b.x) { $("tokviewdesc").textContent = "(this (layer, head) is not embedded)"; return; }
  const K = D.text_cols.length, sc = F32[b.x.f + S.t] / 255, o = b.x.u + S.t * K;
  $("tokviewdesc").textContent = "(" + rowName(tok) + ": share of its attention on each text token, layer " +
    $("layer").value + ", head " + $("head").value + "; click a token to select its row)";
  for (let i = 0; i < K; i++) {
    const el = tv.children[i], c = D.text_cols[i], v = U8[o + i] * sc, a = U8[o + i] / 255;
    el.style.background = "rgba(230,81,0," + a.toFixed(3) + ")";
    el.classList.toggle("cur", c.pos === tok.row); el.classList.toggle("later", c.pos > tok.row);
    el.title = "position " + c.pos + " " + JSON.stringify(c.text) + ": " + pct(v);
  }
}
function legendWords(k, r) {  // what a colour means, in words
  const tv = thru() ? ", traced back through SigLIP to the pixels the resampler's patches drew from" : "";
  if (k === "llm") return "Colour: the share of this token's attention that lands on this area" + tv +
    " (the cells add up to the image share below).";
  if (k === "resampler") return "Colour: the share of image token " + r.q + "'s attention (resampler query " +
    "over the slice's SigLIP patches) that lands on this area" + tv + ".";
  if (k === "vision") return "Colour: the share of the green patch's attention (SigLIP, head mean) that lands on this area.";
  return "Colour: the " + k.slice(2) + " value of this area (its own scale, not an attention share).";
}
const octx = ov.getContext("2d"), gctx = grid.getContext("2d"), gimg = gctx.createImageData(GW, GH);
function draw() {
  refreshOptions();
  for (const el of toks.children) el.classList.toggle("sel", +el.dataset.t === S.t);
  const cur = toks.children[S.t]; if (cur && cur.scrollIntoView) cur.scrollIntoView({block: "nearest"});
  const r = compute(), a = +$("alpha").value;
  const OW = ov.width, OH = ov.height; octx.clearRect(0, 0, OW, OH);
  let hi = 0, lo = 0;
  if (r.map) {
    if (r.hi !== undefined) { lo = r.lo; hi = r.hi; } else { for (const x of r.map) if (x > hi) hi = x; }
    const px = gimg.data, span = hi > lo ? hi - lo : 1, cb = r.clip;
    for (let i = 0; i < r.map.length; i++) {  // heat_overlay.py's rule: opacity a * heat (0 where the map is 0)
      const v = Math.max(0, Math.min(1, (r.map[i] - lo) / span)), c = Math.round(255 * v);
      px[4 * i] = LUT[3 * c]; px[4 * i + 1] = LUT[3 * c + 1]; px[4 * i + 2] = LUT[3 * c + 2];
      px[4 * i + 3] = HAS_IMAGE ? Math.round(255 * a * v) : 255;
      if (cb) {  // one slice's map: transparent outside its box
        const x = ((i % GW) + 0.5) * W / GW, y = (Math.floor(i / GW) + 0.5) * H / GH;
        if (x < cb[0] || x >= cb[2] || y < cb[1] || y >= cb[3]) px[4 * i + 3] = 0;
      }
    }
    gctx.putImageData(gimg, 0, 0);
    octx.globalAlpha = HAS_IMAGE ? 1 : a; octx.imageSmoothingEnabled = false;
    octx.drawImage(grid, 0, 0, OW, OH); octx.globalAlpha = 1;
  }
  const sx = OW / W, sy = OH / H, px1 = window.devicePixelRatio || 1;
  if ($("boxes").checked) {  // the slice grid as thin lines on the slice edges (a shared edge drawn once)
    const seg = new Set();
    D.slices.forEach((sl, i) => {
      if (sl.kind === "source" && r.slice !== i) return;
      const x0 = Math.round(sl.box[0] * sx) + 0.5, y0 = Math.round(sl.box[1] * sy) + 0.5,
            x1 = Math.round(sl.box[2] * sx) - 0.5, y1 = Math.round(sl.box[3] * sy) - 0.5;
      octx.strokeStyle = r.slice === i ? "#00e5ff" : "rgba(255,255,255,0.75)";
      octx.lineWidth = px1; octx.setLineDash(sl.kind === "source" ? [6 * px1, 4 * px1] : []);
      for (const [a, b, c, d] of [[x0, y0, x1, y0], [x1, y0, x1, y1], [x0, y1, x1, y1], [x0, y0, x0, y1]]) {
        const key = [a, b, c, d].map(Math.round).join(",");
        if (r.slice !== i && seg.has(key)) continue;
        seg.add(key); octx.beginPath(); octx.moveTo(a, b); octx.lineTo(c, d); octx.stroke();
      }
    });
    octx.setLineDash([]);
  }
  if (r.mark) { octx.strokeStyle = "#00ff66"; octx.lineWidth = 2 * px1;
    octx.strokeRect(r.mark[0] * sx, r.mark[1] * sy, Math.max(2, r.mark[2] * sx), Math.max(2, r.mark[3] * sy)); }
  const b = block($("layer").value, $("head").value), k = $("kind").value;
  if (b && !k.startsWith("x:")) {
    const sh = b.sh[S.t], ex = $("nosinks").checked && sh.length > 3;
    let img = sh[0];
    if (ex) {  // share of the non-sink attention: the image's mass less its sink tokens', rescaled
      const sc = F32[b.f + S.t] / 255, o = b.u + S.t * N;
      for (const i of D.sink_image) img -= U8[o + i] * sc;
      img *= sinkScale(sh);
    }
    $("share").innerHTML = "";
    const s = document.createElement("b");
    s.textContent = "image share " + pct(img); $("share").appendChild(s);
    $("share").appendChild(document.createTextNode(ex ? "  (of the non-sink attention; the sinks took " +
      pct(sh[3] / rowTotal(sh)) + "; layer " + $("layer").value + ", head " + $("head").value + ")" :
      "  (text " + pct(sh[1]) + ", special " + pct(sh[2]) + (sh.length > 3 ? "; on the sinks " + pct(sh[3]) : "") +
      "; layer " + $("layer").value + ", head " + $("head").value + ")"));
  } else $("share").textContent = "";
  $("info").textContent = r.info;
  drawTokenView();
  $("legendtext").textContent = r.map ? (r.hi !== undefined ? lo.toPrecision(3) + " .. " + hi.toPrecision(3) :
    "0 .. " + pct(hi) + " per cell (" + GW + " x " + GH + " cells)") : "";
  $("legendwords").textContent = r.map ? legendWords(k, r) + (HAS_IMAGE ? " The tint grows with the value: where it " +
    "is low the image shows through unchanged." : "") : "";
  drawLegend(a);
  window.viewerDraws = (window.viewerDraws || 0) + 1;
  if (window.viewerReady === undefined) window.viewerReady = performance.now();
}
function drawLegend(a) {  // the colours as drawn: over the image, more see-through the lower the value
  const lg = $("legend").getContext("2d"); lg.clearRect(0, 0, 256, 12);
  for (let i = 0; i < 256; i++) {
    lg.fillStyle = "rgba(" + LUT[3 * i] + "," + LUT[3 * i + 1] + "," + LUT[3 * i + 2] + "," + (HAS_IMAGE ? a * i / 255 : 1) + ")";
    lg.fillRect(i, 0, 1, 12); } }
for (const id of ["kind", "layer", "head", "vlayer", "slice", "query", "alpha", "boxes", "nosinks", "thruvision", "zoom",
                  "sidebyside"])
  $(id).addEventListener(id === "alpha" || id === "zoom" ? "input" : "change", () => {
    if (id === "slice") S.click = null; if (id === "zoom" || id === "sidebyside") layout(); draw(); });
window.addEventListener("resize", () => { layout(); draw(); });
$("imgwrap").addEventListener("wheel", (ev) => {  // Ctrl + wheel zooms
  if (!ev.ctrlKey) return; ev.preventDefault();
  const z = $("zoom"); z.value = Math.min(4, Math.max(1, +z.value + (ev.deltaY < 0 ? 0.25 : -0.25))); layout(); draw();
}, {passive: false});
ov.addEventListener("click", (ev) => {
  if ($("kind").value !== "vision") return;
  const rect = ov.getBoundingClientRect(), x = (ev.clientX - rect.left) / rect.width * W,
        y = (ev.clientY - rect.top) / rect.height * H, vs = +$("slice").value, sl = D.slices[vs];
  if (x < sl.box[0] || x >= sl.box[2] || y < sl.box[1] || y >= sl.box[3]) return;
  S.click = {s: vs, r: Math.min(sl.tgt[0] - 1, Math.floor((y - sl.box[1]) / (sl.box[3] - sl.box[1]) * sl.tgt[0])),
             c: Math.min(sl.tgt[1] - 1, Math.floor((x - sl.box[0]) / (sl.box[2] - sl.box[0]) * sl.tgt[1]))};
  draw();
});
document.addEventListener("keydown", (ev) => {
  if (ev.target.tagName === "INPUT" || ev.target.tagName === "SELECT") return;
  if (ev.key === "ArrowRight" && S.t < T - 1) { S.t++; draw(); }
  if (ev.key === "ArrowLeft" && S.t > 0) { S.t--; draw(); }
});
window.viewer = {data: D, draw: draw, state: S, compute: compute, grid: [GW, GH], layout: layout, tokenRow: tokenRow};
draw();
})();
