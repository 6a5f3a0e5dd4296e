"use strict";
/*
 * PixelPick annotator page: one queried pixel at a time, labelled with one key press.
 *
 * Nothing between a key press and the next pixel on screen waits for the network: the next pixels are claimed
 * ahead of time and their images decoded in advance, and every change (label, relabel, undo, skip) goes to the
 * server in the background through one ordered outbox that retries until the server answers. The server owns
 * the truth: a rejected change is shown with the server's reason, and the counters are resynchronised whenever
 * the outbox is empty. Changes the server has not acknowledged are also kept in localStorage, so a reload or a
 * closed tab loses none: the next page for the same job and annotator sends them again (the server stores a
 * retried submission once) before it asks for new pixels.
 *
 * Claimed pixels are held from others only while the page is open: it sends a heartbeat every 15 s, and a beacon
 * that gives them back when it closes. While it waits for pixels others hold it asks the server every 2 s, so the
 * counts and the "done" message are the server's, and it says when the first held pixel comes back.
 * After round 0 each pixel may carry the model's class (`suggested`): it is highlighted in the legend and Tab takes it.
 */

const PREFETCH = 6; // pixels claimed ahead of the one on screen (kept small: claimed pixels are held from others)
const REFILL_BELOW = 4; // claim more when fewer than this are queued
const MAX_CLAIM = 64; // the server's limit per request
const ZOOMS = [9, 13, 19, 27, 39, 55, 77, 109, 155]; // image pixels across the magnified view (odd: pixel centred)
const DEFAULT_ZOOM = 5; // 55 px: enough context to tell road from pavement
const HISTORY_LIMIT = 200; // labels kept for back/undo
const KEEP_IMAGES = 12; // decoded images kept in memory (a Cityscapes frame is 8 MB)
const BACKDROP = "#0d0f12";
const NAME_STORAGE = "pixelpick.annotator";
const ZOOM_STORAGE = "pixelpick.zoom";
const PENDING_STORAGE = "pixelpick.pending"; // + job id and annotator: changes not yet acknowledged
const HEARTBEAT_MS = 15000; // the server gives an unheard-from page's pixels back after 60 s
const WAITING_POLL_MS = 2000; // how often a page with nothing to label asks for pixels and counts
const ACCEPT_KEY = "Tab"; // takes the model's suggestion; not a printable character, so no class key collides

const $ = (id) => document.getElementById(id);
const pixelKey = (pixel) => `${pixel.image_id}\n${pixel.y}\n${pixel.x}`;
const imageUrl = (imageId) => "api/images/" + imageId.split("/").map(encodeURIComponent).join("/");

const state = {
  job: null,
  annotator: null,
  images: new Map(), // image_id -> {image_id, height, width, pixels, index}
  imageOrder: [], // image ids in job order
  keyToClass: new Map(), // lower-case key -> class id
  queue: [], // claimed pixels not labelled yet; queue[0] is the one to label
  known: new Set(), // queued and labelled pixels, so a claim never shows a pixel twice
  history: [], // my labels, oldest first: {image_id, y, x, class_id}
  reviewIndex: null, // index into history while reviewing ("back"), else null
  shown: null, // {key, mode, at}: the pixel on screen and since when (performance.now())
  pendingKeyAt: null, // timestamp of the key press whose result is being drawn
  zoom: DEFAULT_ZOOM,
  done: 0,
  total: 0,
  doneByImage: new Map(),
  clicks: { count: 0, seconds: 0, last: null },
  outbox: [],
  sending: false,
  claiming: false, // a claim request is under way
  skips: 0, // images skipped so far
  loaded: new Map(), // image_id -> decoded ImageBitmap
  loading: new Map(), // image_id -> Promise
  shownCount: 0,
  closed: null, // the server's message once the job is closed (its labels were ingested)
  token: null, // from ?token=, for the closing beacon (which also carries the cookie)
  nextReleaseAt: null, // Date.now() when the first pixel someone else holds comes back, if they do not label it
  waitTimer: null,
};
// For measuring in a browser (e.g. driven by Playwright): key press -> next pixel drawn, in ms.
window.pixelpick = { state, latencies: [] };

/* ---------------------------------------------------------------- the server */

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
    keepalive: method !== "GET", // a label sent just before the tab closes still arrives
  });
  const data = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
  return { ok: response.ok, status: response.status, headers: response.headers, data };
}

/** `api`, retried with backoff until the server answers: offline, restarting after a crash, busy (503) or
 *  rate-limited (429, waiting as long as Retry-After says) loses nothing. */
async function answerOf(method, path, body) {
  for (let delay = 250; ; delay = Math.min(delay * 2, 5000)) {
    let wait = delay;
    try {
      const result = await api(method, path, body);
      if (result.status < 500 && result.status !== 429) return result;
      const retryAfter = Number(result.headers.get("Retry-After"));
      if (retryAfter > 0) wait = retryAfter * 1000;
    } catch (error) {
      // no answer at all: try again
    }
    showSync("offline");
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

/** Queue a change; changes reach the server one at a time, in the order they were made. A `persist`ed change
 *  (label, relabel, undo, skip) is kept in localStorage until the server acknowledges it. */
function send(method, path, body, { onDone = () => {}, onReject = () => {}, persist = false } = {}) {
  state.outbox.push({ method, path, body, onDone, onReject, persist });
  if (persist) savePending();
  showSync();
  pump();
}

function pendingKey() {
  return `${PENDING_STORAGE}:${state.job.job_id}:${state.annotator}`;
}

function readPending() {
  try {
    const pending = JSON.parse(localStorage.getItem(pendingKey()) || "[]");
    return Array.isArray(pending) ? pending : [];
  } catch (error) {
    return []; // unreadable: nothing that can be sent
  }
}

function writePending(changes) {
  try {
    if (changes.length) localStorage.setItem(pendingKey(), JSON.stringify(changes));
    else localStorage.removeItem(pendingKey());
  } catch (error) {
    // storage full or disabled: the outbox still retries for as long as the tab is open
  }
}

function savePending() {
  writePending(state.outbox.filter((op) => op.persist).map(({ method, path, body }) => ({ method, path, body })));
}

/** Send the changes an earlier page for this job and annotator left unacknowledged, in their order. */
async function resendPending() {
  const pending = readPending();
  if (pending.length) setOverlay(`Saving ${pending.length} change(s) left from your last visit…`, "loading");
  while (pending.length) {
    const result = await answerOf(pending[0].method, pending[0].path, pending[0].body);
    if (result.data.closed) return jobClosed(result.data); // none of them can be stored any more
    if (!result.ok) showMessage(result.data.detail || `a saved change was refused (HTTP ${result.status})`, "error");
    pending.shift();
    writePending(pending);
  }
  showSync();
}

/** The job's labels were ingested and it accepts no more changes: say so instead of showing a pixel. */
function jobClosed(data) {
  state.closed = data.detail || "This job is closed.";
  if (typeof data.done === "number") syncCounts(data); // the closed panel shows what the server stored
  state.queue = [];
  state.reviewIndex = null;
  state.outbox = state.outbox.filter((op) => !op.persist);
  writePending([]);
  render();
}

async function pump() {
  if (state.sending) return;
  state.sending = true;
  while (state.outbox.length) {
    const op = state.outbox[0];
    const result = await answerOf(op.method, op.path, op.body);
    if (state.outbox[0] !== op) continue; // dropped meanwhile: the job was closed
    state.outbox.shift();
    if (op.persist) savePending();
    if (result.ok) {
      if (!state.outbox.length) syncCounts(result.data);
      op.onDone(result.data);
    } else if (result.data.closed) {
      op.onReject(result.data);
      jobClosed(result.data);
    } else {
      showMessage(result.data.detail || `request failed (HTTP ${result.status})`, "error");
      op.onReject(result.data);
    }
    showSync();
  }
  state.sending = false;
  showSync();
  if (state.closed) return;
  if (!state.queue.length) requestClaims(); // a claim made while labels were pending may have come back short
  if (!current().pixel) render();
}

/** Adopt the server's counts (they include other annotators' work); only called when nothing is pending. */
function syncCounts(data) {
  if (typeof data.done === "number") state.done = data.done;
  if (typeof data.total === "number") state.total = data.total;
  if (data.image_id !== undefined) state.doneByImage.set(data.image_id, data.image_done);
  if (data.done_by_image) state.doneByImage = new Map(Object.entries(data.done_by_image));
  if (data.next_release_s !== undefined) {
    state.nextReleaseAt = data.next_release_s === null ? null : Date.now() + data.next_release_s * 1000;
  }
  showProgress();
}

/** Claim more pixels. A claim does not wait behind queued labels (pixels the page knows are ignored anyway),
 *  except after a skip: the server must give the skipped image back first, or its pixels would return at once. */
async function requestClaims() {
  if (state.claiming || state.closed) return;
  state.claiming = true;
  const skips = state.skips;
  // The server counts pixels whose labels are still in the outbox as held, so ask for those on top.
  const unsent = state.outbox.filter((op) => op.path === "api/labels" && op.method === "POST").length;
  const body = { annotator: state.annotator, count: Math.min(PREFETCH + unsent, MAX_CLAIM) };
  const result = state.outbox.some((op) => op.path === "api/skip")
    ? await new Promise((resolve) => {
        const answered = (ok) => (data) => resolve({ ok, data });
        send("POST", "api/claims", body, { onDone: answered(true), onReject: answered(false) });
      })
    : await answerOf("POST", "api/claims", body);
  state.claiming = false;
  if (state.skips !== skips) return requestClaims(); // this answer may hold pixels of the skipped image
  if (result.data.closed) return jobClosed(result.data);
  if (!result.ok) return showMessage(result.data.detail || "cannot get pixels to label", "error");
  if (!state.outbox.length) syncCounts(result.data);
  addClaims(result.data.pixels);
}

/** Nothing to label: ask again every few seconds, so pixels others give back, the job's count and "done" arrive
 *  from the server without waiting for a key. */
function waitForPixels() {
  if (state.waitTimer !== null || state.closed) return;
  state.waitTimer = setTimeout(() => {
    state.waitTimer = null;
    if (state.closed || current().pixel) return;
    Promise.resolve(requestClaims()).then(() => {
      if (!current().pixel) render();
    });
  }, WAITING_POLL_MS);
}

function heartbeat() {
  if (!state.annotator || state.closed) return;
  api("POST", "api/heartbeat", { annotator: state.annotator }).then((result) => {
    if (result.data.closed) return jobClosed(result.data);
    if (result.ok && !state.outbox.length) syncCounts(result.data);
  }, () => {});
}

/** The page is closing: give its unlabelled pixels back at once. Not while changes are unsent, or their pixels
 *  could go to someone else before the next visit sends them; those lapse 60 s after the last heartbeat. */
function releasePixels() {
  if (!state.annotator || state.closed || state.outbox.some((op) => op.persist)) return;
  const query = state.token ? `?token=${encodeURIComponent(state.token)}` : "";
  navigator.sendBeacon(`api/release${query}`, JSON.stringify({ annotator: state.annotator }));
}

/** Back from the back-forward cache or a long time hidden: the pixels queued here may have gone to others. */
function reclaim() {
  if (!state.annotator || state.closed || state.outbox.length) return;
  state.queue.forEach((pixel) => state.known.delete(pixelKey(pixel)));
  state.queue = [];
  requestClaims();
}

function addClaims(pixels) {
  const wasEmpty = !current().pixel;
  for (const pixel of pixels) {
    if (state.known.has(pixelKey(pixel))) continue;
    state.known.add(pixelKey(pixel));
    state.queue.push(pixel);
  }
  prefetchImages();
  if (wasEmpty) render();
  if (!state.queue.length) waitForPixels(); // others may give up, or finish the job
}

/* ---------------------------------------------------------------- images */

/** The image, fetched and decoded into an ImageBitmap: decoding happens off the main thread, ahead of time,
 *  so drawing it after a key press costs almost nothing. */
function imageFor(imageId) {
  if (!state.loading.has(imageId)) {
    const ready = fetch(imageUrl(imageId))
      .then((response) => {
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        return response.blob();
      })
      .then((blob) => createImageBitmap(blob))
      .then(
        (bitmap) => {
          state.loaded.set(imageId, bitmap);
          return bitmap;
        },
        (error) => {
          state.loading.delete(imageId); // try again next time it is needed
          throw new Error(`cannot load image ${imageId}: ${error.message}`);
        },
      );
    state.loading.set(imageId, ready);
  }
  return state.loading.get(imageId);
}

function prefetchImages() {
  const wanted = new Set(state.queue.map((pixel) => pixel.image_id));
  const last = state.queue[state.queue.length - 1];
  if (last) wanted.add(state.imageOrder[state.images.get(last.image_id).index + 1]); // likely needed next
  wanted.delete(undefined);
  state.history.slice(-10).forEach((pixel) => wanted.add(pixel.image_id));
  for (const imageId of wanted) imageFor(imageId).catch(() => {});
  if (state.loaded.size > KEEP_IMAGES) {
    for (const [imageId, bitmap] of state.loaded) {
      if (!wanted.has(imageId)) {
        bitmap.close();
        state.loaded.delete(imageId);
        state.loading.delete(imageId);
      }
    }
  }
}

/* ---------------------------------------------------------------- drawing */

function current() {
  if (state.closed) return { pixel: null, mode: "closed" };
  if (state.reviewIndex !== null) return { pixel: state.history[state.reviewIndex], mode: "review" };
  return { pixel: state.queue[0] || null, mode: "label" };
}

function render() {
  const { pixel, mode } = current();
  const crop = $("crop");
  showProgress();
  showLegendChoice(mode === "review" ? pixel.class_id : null, mode === "label" && pixel ? pixel.suggested ?? null : null);
  $("review-banner").hidden = mode !== "review";
  if (!pixel) return renderEmpty();
  const image = state.loaded.get(pixel.image_id);
  if (!image) {
    state.shown = null;
    setOverlay("Loading image…", "loading");
    imageFor(pixel.image_id).then(
      () => render(),
      (error) => showMessage(error.message, "error"),
    );
    return;
  }
  setOverlay(null, mode);
  drawCrop(image, pixel);
  drawContext(image, pixel);
  const meta = state.images.get(pixel.image_id);
  $("pixel-info").textContent =
    `Image ${meta.index + 1} of ${state.images.size} · ${pixel.image_id} · pixel y ${pixel.y}, x ${pixel.x}`;
  if (mode === "review") {
    const name = className(pixel.class_id);
    $("review-banner").textContent =
      `Reviewing your label “${name}”: a class key changes it, → goes to the next, Esc back to labelling.`;
  }
  Object.assign(crop.dataset, { imageId: pixel.image_id, y: pixel.y, x: pixel.x });
  const key = pixelKey(pixel);
  if (!state.shown || state.shown.key !== key || state.shown.mode !== mode) {
    state.shown = { key, mode, at: performance.now() }; // a zoom redraw keeps the clock running
  }
  crop.dataset.shown = ++state.shownCount;
  const keyAt = state.pendingKeyAt;
  state.pendingKeyAt = null;
  if (keyAt !== null) {
    requestAnimationFrame(() => window.pixelpick.latencies.push(performance.now() - keyAt));
  }
}

function renderEmpty() {
  state.shown = null;
  for (const canvas of [$("crop"), $("context")]) canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  $("pixel-info").textContent = "";
  $("progress-image").textContent = "–";
  if (state.closed) return setOverlay(state.closed, "closed");
  // The counts are the server's only once nothing is unsent; until then say so rather than guess.
  if (state.outbox.length) return setOverlay("Saving your last labels…", "waiting");
  if (state.claiming || state.total === 0) return setOverlay("Loading…", "loading");
  if (state.done >= state.total) {
    return setOverlay(`All ${state.total} pixels of this job are labelled. Thank you!`, "done");
  }
  waitForPixels();
  const left = state.total - state.done;
  let when = "Checking every few seconds…";
  if (state.nextReleaseAt !== null) {
    const seconds = Math.max(0, Math.ceil((state.nextReleaseAt - Date.now()) / 1000));
    const at = new Date(state.nextReleaseAt).toLocaleTimeString();
    when = `Unless they label them, the first come back in ${seconds} s (at ${at}); checking every few seconds…`;
  }
  setOverlay(`The remaining ${left} pixels are with other annotators. ${when}`, "waiting");
}

function setOverlay(text, mode) {
  $("crop").dataset.mode = mode;
  $("overlay").hidden = text === null;
  if (text !== null) $("overlay").textContent = text;
}

/** Size a canvas's backing store to its CSS size in device pixels, so lines stay crisp. */
function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.round(canvas.clientWidth * ratio);
  const height = Math.round(canvas.clientHeight * ratio);
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  return [width, height];
}

/** The magnified crop: nearest neighbour, the pixel's footprint in the exact centre. */
function drawCrop(image, pixel) {
  const canvas = $("crop");
  const context = canvas.getContext("2d");
  const [size] = fitCanvas(canvas);
  const meta = state.images.get(pixel.image_id);
  const across = ZOOMS[state.zoom];
  const scale = size / across; // canvas px per image pixel
  // The job's coordinates are at the working resolution; the file may be larger (it is shown at full detail).
  const fileX = image.width / meta.width;
  const fileY = image.height / meta.height;
  const left = pixel.x + 0.5 - across / 2;
  const top = pixel.y + 0.5 - across / 2;
  const x0 = Math.max(left, 0);
  const y0 = Math.max(top, 0);
  const x1 = Math.min(left + across, meta.width);
  const y1 = Math.min(top + across, meta.height);
  context.fillStyle = BACKDROP;
  context.fillRect(0, 0, size, size);
  context.imageSmoothingEnabled = false;
  context.drawImage(
    image,
    x0 * fileX, y0 * fileY, (x1 - x0) * fileX, (y1 - y0) * fileY,
    (x0 - left) * scale, (y0 - top) * scale, (x1 - x0) * scale, (y1 - y0) * scale,
  );
  drawMarker(context, size / 2, size / 2, scale);
}

/** A square around the pixel and a ring around that, each a white line on a black one: visible on any colour,
 *  and leaving the pixel itself uncovered. */
function drawMarker(context, cx, cy, scale) {
  const ratio = window.devicePixelRatio || 1;
  const half = scale / 2;
  if (scale >= 6 * ratio) {
    const gap = 2 * ratio;
    outline(context, ratio, () =>
      context.strokeRect(cx - half - gap, cy - half - gap, scale + 2 * gap, scale + 2 * gap));
  }
  const radius = Math.max(half * Math.SQRT2 + 12 * ratio, 16 * ratio);
  outline(context, ratio, () => {
    context.beginPath();
    context.arc(cx, cy, radius, 0, 2 * Math.PI);
    context.stroke();
  });
}

function outline(context, ratio, strokePath, width = 1.5) {
  context.lineWidth = (width + 2) * ratio;
  context.strokeStyle = "rgba(0, 0, 0, 0.85)";
  strokePath();
  context.lineWidth = width * ratio;
  context.strokeStyle = "#ffffff";
  strokePath();
}

/** The whole image, small, with the magnified area and the pixel marked. */
function drawContext(image, pixel) {
  const canvas = $("context");
  const meta = state.images.get(pixel.image_id);
  canvas.style.aspectRatio = `${meta.width} / ${meta.height}`;
  const [width, height] = fitCanvas(canvas);
  const context = canvas.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  context.imageSmoothingEnabled = true;
  context.drawImage(image, 0, 0, width, height);
  const scale = width / meta.width;
  const across = ZOOMS[state.zoom];
  const cx = (pixel.x + 0.5) * scale;
  const cy = (pixel.y + 0.5) * height / meta.height;
  outline(context, ratio, () =>
    context.strokeRect(cx - (across / 2) * scale, cy - (across / 2) * scale, across * scale, across * scale), 1);
  outline(context, ratio, () => {
    context.beginPath();
    context.arc(cx, cy, 4 * ratio, 0, 2 * Math.PI);
    context.stroke();
  }, 1);
}

function showProgress() {
  const { pixel } = current();
  if (pixel) {
    const inImage = state.images.get(pixel.image_id).pixels;
    const doneInImage = state.doneByImage.get(pixel.image_id) || 0;
    $("progress-image").textContent = `${doneInImage} of ${inImage} done · ${inImage - doneInImage} left`;
  }
  $("progress-job").textContent = `${state.done} of ${state.total} done · ${state.total - state.done} left`;
  const { count, seconds, last } = state.clicks;
  if (count) {
    const lastText = last === null ? "" : ` · last ${last.toFixed(2)} s`;
    $("progress-time").textContent = `mean ${(seconds / count).toFixed(2)} s${lastText}`;
  }
}

function showLegendChoice(classId, suggested = null) {
  for (const item of $("legend").children) {
    item.classList.toggle("chosen", classId !== null && Number(item.dataset.classId) === classId);
    item.classList.toggle("suggested", suggested !== null && Number(item.dataset.classId) === suggested);
  }
  const hint = $("suggestion");
  hint.hidden = suggested === null;
  if (suggested !== null) hint.textContent = `Model suggests “${className(suggested)}”: Tab accepts, a class key overrides.`;
}

function showSync(override) {
  const sync = $("sync");
  const pending = state.outbox.length;
  const mode = override || (pending ? "saving" : "saved");
  sync.dataset.state = mode;
  sync.textContent = mode === "offline" ? "offline – retrying" : pending ? `saving ${pending}…` : "saved";
}

let messageTimer = null;
function showMessage(text, kind = "hint") {
  const box = $("message");
  box.textContent = text;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(messageTimer);
  messageTimer = setTimeout(() => (box.hidden = true), kind === "error" ? 8000 : 3500);
}

/* ---------------------------------------------------------------- keys */

const NAVIGATION = {
  " ": { run: (event) => answer(state.job.ignore_index, event) },
  Backspace: { run: undo },
  ArrowLeft: { run: back },
  ArrowRight: { run: forward },
  Escape: { run: stopReviewing },
  Enter: { run: skipImage },
  [ACCEPT_KEY]: { run: acceptSuggestion },
  "+": { run: () => zoom(-1), repeats: true },
  "=": { run: () => zoom(-1), repeats: true },
  "-": { run: () => zoom(+1), repeats: true },
};

function onKeyDown(event) {
  if (!state.job || !state.annotator || state.closed || event.target.closest?.("input, textarea, button")) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return; // leave browser shortcuts alone
  const action = NAVIGATION[event.key];
  if (action) {
    event.preventDefault();
    if (!event.repeat || action.repeats) action.run(event);
    return;
  }
  if (event.key.length !== 1) return; // Shift, Tab, F5, ...: not ours
  const classId = state.keyToClass.get(event.key.toLowerCase());
  if (classId === undefined) {
    showMessage(`“${event.key}” is not a class key – the keys are listed on the right (Space = unsure).`);
    return;
  }
  event.preventDefault();
  if (!event.repeat) answer(classId, event); // holding a key down must not label a run of pixels
}

function acceptSuggestion(event) {
  const { pixel, mode } = current();
  if (mode !== "label" || !pixel || pixel.suggested === null || pixel.suggested === undefined) return;
  answer(pixel.suggested, event, true);
}

function answer(classId, event, accepted = false) {
  const { pixel, mode } = current();
  if (!pixel || !state.shown || state.shown.key !== pixelKey(pixel)) return;
  const seconds = Math.max(0, (event.timeStamp - state.shown.at) / 1000);
  const body = {
    annotator: state.annotator,
    image_id: pixel.image_id,
    y: pixel.y,
    x: pixel.x,
    class_id: classId,
    seconds,
    submission_id: newSubmissionId(),
    accepted,
  };
  state.pendingKeyAt = event.timeStamp;
  if (mode === "review") {
    if (pixel.class_id !== classId) {
      pixel.class_id = classId;
      send("PUT", "api/labels", body, { persist: true });
    }
    return forward();
  }
  state.queue.shift();
  const labelled = { image_id: pixel.image_id, y: pixel.y, x: pixel.x, class_id: classId };
  state.history.push(labelled);
  if (state.history.length > HISTORY_LIMIT) state.history.shift();
  countDone(pixel.image_id, +1);
  state.clicks = { count: state.clicks.count + 1, seconds: state.clicks.seconds + seconds, last: seconds };
  send("POST", "api/labels", body, {
    persist: true,
    onReject: () => {
      // Not stored: forget it locally too, so back/undo and the counts match the server.
      state.history = state.history.filter((item) => item !== labelled);
      countDone(pixel.image_id, -1);
      showProgress();
    },
  });
  render();
  if (state.queue.length < REFILL_BELOW) requestClaims();
  prefetchImages();
}

function countDone(imageId, step) {
  state.done += step;
  state.doneByImage.set(imageId, (state.doneByImage.get(imageId) || 0) + step);
}

function undo() {
  state.reviewIndex = null;
  const last = state.history.pop();
  if (!last) return showMessage("Nothing to undo.");
  const pixel = { image_id: last.image_id, y: last.y, x: last.x };
  state.queue.unshift(pixel);
  countDone(pixel.image_id, -1);
  send("POST", "api/undo", { annotator: state.annotator, expected: pixel }, { onReject: reloadState, persist: true });
  render();
}

function back() {
  if (!state.history.length) return showMessage("No labels to review yet.");
  if (state.reviewIndex === 0) return showMessage("That is the oldest label you can review.");
  state.reviewIndex = (state.reviewIndex === null ? state.history.length : state.reviewIndex) - 1;
  render();
}

function forward() {
  if (state.reviewIndex === null) return;
  state.reviewIndex += 1;
  if (state.reviewIndex >= state.history.length) state.reviewIndex = null;
  render();
}

function stopReviewing() {
  if (state.reviewIndex === null) return;
  state.reviewIndex = null;
  render();
}

function skipImage() {
  state.reviewIndex = null;
  const pixel = state.queue[0];
  if (!pixel) return;
  const skipped = state.queue.filter((item) => item.image_id === pixel.image_id);
  skipped.forEach((item) => state.known.delete(pixelKey(item)));
  state.queue = state.queue.filter((item) => item.image_id !== pixel.image_id);
  state.skips += 1;
  send("POST", "api/skip", { annotator: state.annotator, image_id: pixel.image_id }, { persist: true });
  showMessage(`Skipped the rest of ${pixel.image_id}; it comes back after the other images.`);
  requestClaims();
  render();
}

function zoom(step) {
  state.zoom = Math.min(Math.max(state.zoom + step, 0), ZOOMS.length - 1);
  localStorage.setItem(ZOOM_STORAGE, String(state.zoom));
  $("zoom-level").textContent = `(${ZOOMS[state.zoom]} px across)`;
  render();
}

function newSubmissionId() {
  // crypto.randomUUID needs a secure context; getRandomValues works on plain http over the LAN too.
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function className(classId) {
  if (classId === state.job.ignore_index) return "unsure";
  return state.job.classes[classId].name;
}

/* ---------------------------------------------------------------- start-up */

async function getJSON(path) {
  const { ok, data } = await api("GET", path);
  if (!ok) throw new Error(data.detail || `cannot load ${path}`);
  return data;
}

function askName() {
  return new Promise((resolve) => {
    const form = $("name-form");
    form.hidden = false;
    $("name-input").focus();
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      form.hidden = true;
      resolve($("name-input").value.trim());
    }, { once: true });
  });
}

function buildLegend(job) {
  const legend = $("legend");
  const entries = job.classes.map((info) => [info.id, info.key, info.name, `rgb(${info.colour.join(",")})`]);
  const hatched = "repeating-linear-gradient(45deg, #555 0 3px, #222 3px 6px)";
  entries.push([job.ignore_index, "Space", "unsure / void", hatched]);
  for (const [classId, key, name, colour] of entries) {
    const item = document.createElement("li");
    item.dataset.classId = classId;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour;
    const kbd = document.createElement("kbd");
    kbd.textContent = key;
    item.append(swatch, kbd, document.createTextNode(" " + name));
    legend.append(item);
  }
}

function loadState(data) {
  state.history = data.history;
  state.history.forEach((pixel) => state.known.add(pixelKey(pixel)));
  state.clicks = { count: data.my_labels, seconds: data.my_seconds, last: null };
  syncCounts(data);
}

function reloadState() {
  send("GET", `api/state?annotator=${encodeURIComponent(state.annotator)}`, null, {
    onDone: (data) => {
      state.reviewIndex = null;
      loadState(data);
      render();
    },
  });
}

async function start() {
  const url = new URL(window.location.href);
  if (url.searchParams.has("token")) {
    state.token = url.searchParams.get("token");
    url.searchParams.delete("token"); // the server has set a cookie; keep the token out of history
    window.history.replaceState(null, "", url);
  }
  const job = await getJSON("api/job");
  state.job = job;
  state.total = job.images.reduce((sum, image) => sum + image.pixels, 0);
  job.images.forEach((image, index) => state.images.set(image.image_id, { ...image, index }));
  state.imageOrder = job.images.map((image) => image.image_id);
  job.classes.forEach((info) => state.keyToClass.set(info.key.toLowerCase(), info.id));
  buildLegend(job);
  $("job-title").textContent = `job ${job.job_id} · round ${job.round}`;
  const savedZoom = Number(localStorage.getItem(ZOOM_STORAGE) ?? DEFAULT_ZOOM);
  state.zoom = Number.isInteger(savedZoom) && savedZoom >= 0 && savedZoom < ZOOMS.length ? savedZoom : DEFAULT_ZOOM;
  $("zoom-level").textContent = `(${ZOOMS[state.zoom]} px across)`;

  const fromUrl = url.searchParams.get("annotator");
  const annotator = fromUrl || localStorage.getItem(NAME_STORAGE) || job.default_annotator || (await askName());
  localStorage.setItem(NAME_STORAGE, annotator);
  state.annotator = annotator;
  $("annotator-name").textContent = `labelling as ${annotator}`;
  if (job.closed) return jobClosed({ detail: closedMessage(job.closed), done: job.done, total: job.total });

  await resendPending();
  if (state.closed) return;
  loadState(await getJSON(`api/state?annotator=${encodeURIComponent(annotator)}`));
  requestClaims();
  render();
}

function closedMessage(closed) {
  const when = new Date(closed.closed_at).toLocaleString();
  return `This job's labels were ingested and the job is closed (since ${when}: ${closed.note}). Thank you!`;
}

document.addEventListener("keydown", onKeyDown);
window.addEventListener("resize", () => current().pixel && render());
setInterval(heartbeat, HEARTBEAT_MS);
window.addEventListener("pagehide", releasePixels);
window.addEventListener("pageshow", (event) => event.persisted && reclaim());
let hiddenAt = null;
document.addEventListener("visibilitychange", () => {
  // A hidden tab's timers are throttled (to once a minute in Chromium), so its leases may have lapsed meanwhile.
  if (document.visibilityState === "hidden") hiddenAt = Date.now();
  else if (hiddenAt !== null && Date.now() - hiddenAt > 45000) reclaim();
});
window.addEventListener("beforeunload", (event) => {
  if (state.outbox.length) event.preventDefault(); // a change is not on the server yet
});
start().catch((error) => {
  setOverlay(error.message, "error");
  showMessage(error.message, "error");
});
