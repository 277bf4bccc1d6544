// The ppzoo page: every panel talks to the JSON API of the same server (no external scripts).
"use strict";
const $ = (id) => document.getElementById(id);

async function postJSON(path, body) {
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(`${response.status}: ${JSON.stringify(data.detail ?? data)}`);
  return data;
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value; o.textContent = label ?? value; select.appendChild(o);
}

let MODELS = [];
async function loadModels() {
  const data = await (await fetch("/models")).json();
  MODELS = data.models;
  $("status").textContent = MODELS.map((m) => `${m.name} (${m.kind})`).join(" · ") || "no models loaded";
  for (const m of MODELS.filter((m) => m.kind === "text")) option($("chat-model"), m.name, `${m.name} · ${m.module}`);
  updateStrategies();
  for (const [panel, kind] of [["image-panel", "vilg"], ["fold-panel", "folding"], ["codefix-panel", "text"]]) {
    if (!MODELS.some((m) => m.kind === kind)) $(panel).classList.add("unavailable");
  }
}
function updateStrategies() {
  const model = MODELS.find((m) => m.name === $("chat-model").value);
  $("chat-strategy").innerHTML = "";
  for (const s of model ? model.strategies : ["base"]) option($("chat-strategy"), s);
  $("chat-kcache").disabled = !(model && model.kcache);
}

// ------------------------------------------------------------------ chat: POST /generate, server-sent events
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const event = (block.match(/^event: (.*)$/m) || [])[1] || "message";
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      yield {event, data: data ? JSON.parse(data) : null};
    }
  }
}

$("chat-model").addEventListener("change", updateStrategies);
$("chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const prompt = $("chat-input").value;
  if (!prompt) return;
  const entry = document.createElement("div");
  entry.innerHTML = '<span class="prompt"></span><span class="completion"></span> <span class="meta"></span>';
  entry.querySelector(".prompt").textContent = prompt;
  $("chat-log").appendChild(entry);
  const out = entry.querySelector(".completion");
  const body = {prompt, model: $("chat-model").value || null, max_new_tokens: Number($("chat-max").value),
                temperature: Number($("chat-temp").value), strategy: $("chat-strategy").value || "base"};
  if ($("chat-kcache").value && !$("chat-kcache").disabled) body.kcache_top_n = Number($("chat-kcache").value);
  $("chat-send").disabled = true;
  try {
    const response = await fetch("/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                               body: JSON.stringify(body)});
    if (!response.ok) throw new Error(`${response.status}: ${JSON.stringify((await response.json()).detail)}`);
    for await (const {event, data} of sseEvents(response)) {
      if (event === "token") out.textContent += data.text;
      else if (event === "done") entry.querySelector(".meta").textContent =
        `[${data.tokens} tokens, ${data.seconds}s, batch of ${data.batch_size}]`;
      else if (event === "error") throw new Error(data.detail);
      $("chat-log").scrollTop = $("chat-log").scrollHeight;
    }
  } catch (err) {
    entry.insertAdjacentHTML("beforeend", '<div class="error"></div>');
    entry.lastChild.textContent = String(err.message || err);
  } finally {
    $("chat-send").disabled = false;
  }
});

// ------------------------------------------------------------------ code fix
$("codefix-send").addEventListener("click", async () => {
  $("codefix-output").textContent = "…";
  try {
    const data = await postJSON("/codefix", {code: $("codefix-input").value, max_new_tokens: 96});
    $("codefix-output").textContent = data.fixed_code;
  } catch (err) { $("codefix-output").textContent = String(err.message); }
});

// ------------------------------------------------------------------ text to image, captioning
$("image-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const data = await postJSON("/text-to-image", {prompt: $("image-prompt").value, candidates: 2});
    $("image-output").src = "data:image/png;base64," + data.png_base64;
    $("image-output").title = `log p(caption | image) = ${data.caption_log_likelihood.toFixed(2)}`;
  } catch (err) { $("caption-output").textContent = String(err.message); }
});
$("caption-send").addEventListener("click", async () => {
  const file = $("caption-file").files[0];
  let base64;
  if (file) {
    const bytes = new Uint8Array(await file.arrayBuffer());
    base64 = btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""));
  } else if ($("image-output").src.startsWith("data:")) {
    base64 = $("image-output").src.split(",")[1];  // caption the image just drawn
  } else { $("caption-output").textContent = "choose an image or draw one first"; return; }
  try { $("caption-output").textContent = (await postJSON("/caption", {image_base64: base64})).caption; }
  catch (err) { $("caption-output").textContent = String(err.message); }
});

// ------------------------------------------------------------------ folding: C-alpha trace coloured by pLDDT
const BANDS = [[90, [0, 83, 214]], [70, [101, 203, 243]], [50, [255, 219, 19]], [0, [255, 125, 69]]];
const bandColor = (p) => `rgb(${BANDS.find(([lo]) => p >= lo)[1].join(",")})`;
const view = {atoms: [], yaw: 0.6, pitch: 0.3};

function caTrace(pdb) {
  const atoms = [];
  for (const line of pdb.split("\n")) {
    if (!line.startsWith("ATOM") || line.slice(12, 16).trim() !== "CA") continue;
    atoms.push({x: +line.slice(30, 38), y: +line.slice(38, 46), z: +line.slice(46, 54),
                plddt: +line.slice(60, 66)});
  }
  const n = atoms.length || 1;
  const c = ["x", "y", "z"].map((k) => atoms.reduce((s, a) => s + a[k], 0) / n);
  for (const a of atoms) { a.x -= c[0]; a.y -= c[1]; a.z -= c[2]; }
  return atoms;
}

function drawStructure() {
  const canvas = $("fold-view"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const atoms = view.atoms;
  if (!atoms.length) return;
  const [cy, sy, cp, sp] = [Math.cos(view.yaw), Math.sin(view.yaw), Math.cos(view.pitch), Math.sin(view.pitch)];
  const pts = atoms.map((a) => {
    const x = cy * a.x + sy * a.z, z0 = -sy * a.x + cy * a.z;
    return {x, y: cp * a.y - sp * z0, z: sp * a.y + cp * z0, plddt: a.plddt};
  });
  const radius = Math.max(...pts.map((p) => Math.hypot(p.x, p.y)), 1);
  const scale = 0.45 * Math.min(canvas.width, canvas.height) / radius;
  const sx = (p) => canvas.width / 2 + p.x * scale, syy = (p) => canvas.height / 2 - p.y * scale;
  // Bonds back to front (painter's order by mean depth), each coloured by its residues' pLDDT.
  const bonds = pts.slice(1).map((p, i) => [pts[i], p]).sort((a, b) => (a[0].z + a[1].z) - (b[0].z + b[1].z));
  ctx.lineWidth = 4; ctx.lineCap = "round";
  for (const [a, b] of bonds) {
    ctx.strokeStyle = bandColor(Math.min(a.plddt, b.plddt));
    ctx.beginPath(); ctx.moveTo(sx(a), syy(a)); ctx.lineTo(sx(b), syy(b)); ctx.stroke();
  }
  // Each C-alpha as a dot (also what shows when atoms coincide, e.g. an untrained model's output).
  for (const p of [...pts].sort((a, b) => a.z - b.z)) {
    ctx.fillStyle = bandColor(p.plddt);
    ctx.beginPath(); ctx.arc(sx(p), syy(p), 3.5, 0, 2 * Math.PI); ctx.fill();
  }
}

let drag = null;
$("fold-view").addEventListener("mousedown", (e) => { drag = [e.clientX, e.clientY]; });
window.addEventListener("mouseup", () => { drag = null; });
window.addEventListener("mousemove", (e) => {
  if (!drag) return;
  view.yaw += (e.clientX - drag[0]) * 0.01; view.pitch += (e.clientY - drag[1]) * 0.01;
  drag = [e.clientX, e.clientY]; drawStructure();
});

$("fold-send").addEventListener("click", async () => {
  $("fold-summary").textContent = "folding…";
  try {
    const data = await postJSON("/fold", {fasta: $("fold-input").value});
    view.atoms = caTrace(data.pdb);
    drawStructure();
    $("fold-pdb").textContent = data.pdb;
    $("fold-summary").textContent = `${data.name}: ${data.sequence.length} residues, mean pLDDT ` +
                                    `${data.mean_plddt.toFixed(1)}`;
  } catch (err) { $("fold-summary").textContent = String(err.message); }
});

loadModels();
