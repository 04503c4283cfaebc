// Vary (Region) editor: mark the region to repaint with a rectangle, lasso or brush, then send
// a black-and-white PNG mask (white = repaint) of the picture's exact size with the prompt.
// Served by the gallery itself; the page's CSP allows no inline script and no other origin.
"use strict";

(() => {
  const root = document.getElementById("editor");
  const overlay = document.getElementById("overlay");
  const promptBox = document.getElementById("prompt");
  const submit = document.getElementById("submit");
  const status = document.getElementById("status");
  const brushSize = document.getElementById("brush-size");
  const width = Number(root.dataset.width);
  const height = Number(root.dataset.height);

  // The selection lives on its own canvas at the picture's full resolution: opaque white where
  // the member marked, transparent elsewhere. The overlay only displays it.
  const selection = document.createElement("canvas");
  selection.width = width;
  selection.height = height;
  const sel = selection.getContext("2d");
  const view = overlay.getContext("2d");
  const history = [];
  const HISTORY_LIMIT = 25;
  const TINT = "rgba(138, 180, 255, 0.55)";

  let tool = "rect";
  let drawing = null; // {kind, points: [[x, y]...], pointerId}
  let sent = false;

  const point = (event) => {
    const box = overlay.getBoundingClientRect();
    return [
      ((event.clientX - box.left) * width) / box.width,
      ((event.clientY - box.top) * height) / box.height,
    ];
  };

  const scale = () => width / overlay.getBoundingClientRect().width;

  const hasSelection = () => {
    const data = sel.getImageData(0, 0, width, height).data;
    for (let i = 3; i < data.length; i += 4) {
      if (data[i] >= 128) return true;
    }
    return false;
  };

  const refresh = () => {
    view.save();
    view.clearRect(0, 0, width, height);
    view.drawImage(selection, 0, 0);
    view.globalCompositeOperation = "source-in";
    view.fillStyle = TINT;
    view.fillRect(0, 0, width, height);
    view.restore();
    if (drawing && drawing.kind !== "brush" && drawing.points.length > 1) {
      view.save();
      view.strokeStyle = "#ffffff";
      view.lineWidth = 2 * scale();
      view.setLineDash([8 * scale(), 6 * scale()]);
      view.beginPath();
      if (drawing.kind === "rect") {
        const [a, b] = [drawing.points[0], drawing.points[drawing.points.length - 1]];
        view.rect(a[0], a[1], b[0] - a[0], b[1] - a[1]);
      } else {
        drawing.points.forEach(([x, y], i) => (i ? view.lineTo(x, y) : view.moveTo(x, y)));
        view.closePath();
      }
      view.stroke();
      view.restore();
    }
    submit.disabled = sent || !promptBox.value.trim() || !hasSelection();
  };

  const remember = () => {
    history.push(sel.getImageData(0, 0, width, height));
    if (history.length > HISTORY_LIMIT) history.shift();
  };

  const brushTo = (from, to) => {
    sel.save();
    sel.strokeStyle = "#ffffff";
    sel.fillStyle = "#ffffff";
    sel.lineCap = "round";
    sel.lineJoin = "round";
    sel.lineWidth = Number(brushSize.value) * scale();
    sel.beginPath();
    sel.moveTo(from[0], from[1]);
    sel.lineTo(to[0], to[1]);
    sel.stroke();
    sel.restore();
  };

  const finish = () => {
    const shape = drawing;
    drawing = null;
    if (!shape) return;
    sel.save();
    sel.fillStyle = "#ffffff";
    if (shape.kind === "rect" && shape.points.length > 1) {
      const [a, b] = [shape.points[0], shape.points[shape.points.length - 1]];
      sel.fillRect(Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.abs(b[0] - a[0]), Math.abs(b[1] - a[1]));
    } else if (shape.kind === "lasso" && shape.points.length > 2) {
      sel.beginPath();
      shape.points.forEach(([x, y], i) => (i ? sel.lineTo(x, y) : sel.moveTo(x, y)));
      sel.closePath();
      sel.fill();
    }
    sel.restore();
    refresh();
  };

  overlay.addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || sent) return;
    event.preventDefault();
    overlay.setPointerCapture(event.pointerId);
    remember();
    const at = point(event);
    drawing = { kind: tool, points: [at], pointerId: event.pointerId };
    if (tool === "brush") brushTo(at, at);
    refresh();
  });

  overlay.addEventListener("pointermove", (event) => {
    if (!drawing || event.pointerId !== drawing.pointerId) return;
    const at = point(event);
    if (drawing.kind === "brush") brushTo(drawing.points[drawing.points.length - 1], at);
    drawing.points.push(at);
    refresh();
  });

  const end = (event) => {
    if (!drawing || event.pointerId !== drawing.pointerId) return;
    drawing.points.push(point(event));
    finish();
  };
  overlay.addEventListener("pointerup", end);
  overlay.addEventListener("pointercancel", () => {
    drawing = null;
    refresh();
  });

  document.querySelectorAll(".tool").forEach((button) => {
    button.addEventListener("click", () => {
      tool = button.dataset.tool;
      document.querySelectorAll(".tool").forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
    });
  });

  document.getElementById("undo").addEventListener("click", () => {
    const previous = history.pop();
    if (previous) sel.putImageData(previous, 0, 0);
    refresh();
  });

  document.getElementById("clear").addEventListener("click", () => {
    remember();
    sel.clearRect(0, 0, width, height);
    refresh();
  });

  document.getElementById("invert").addEventListener("click", () => {
    remember();
    sel.save();
    sel.globalCompositeOperation = "xor";
    sel.fillStyle = "#ffffff";
    sel.fillRect(0, 0, width, height);
    sel.restore();
    refresh();
  });

  promptBox.addEventListener("input", refresh);

  const maskPng = () => {
    const mask = document.createElement("canvas");
    mask.width = width;
    mask.height = height;
    const m = mask.getContext("2d");
    m.fillStyle = "#000000";
    m.fillRect(0, 0, width, height);
    m.drawImage(selection, 0, 0);
    return mask.toDataURL("image/png").split(",", 2)[1];
  };

  const say = (text, kind) => {
    status.textContent = text;
    status.className = "status " + (kind || "");
  };

  submit.addEventListener("click", async () => {
    if (submit.disabled) return;
    submit.disabled = true;
    say("Sending…");
    try {
      const response = await fetch(window.location.pathname, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt: promptBox.value, mask: maskPng() }),
        credentials: "omit",
        cache: "no-store",
      });
      let answer = {};
      try {
        answer = await response.json();
      } catch (error) {
        answer = {};
      }
      if (response.ok) {
        sent = true;
        say(answer.message || "Submitted.", "ok");
        submit.textContent = "Submitted";
      } else {
        say(answer.error || "The edit could not be submitted (" + response.status + ").", "bad");
      }
    } catch (error) {
      say("The gallery could not be reached. Try again.", "bad");
    }
    refresh();
  });

  refresh();
})();
