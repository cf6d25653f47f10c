"use strict";
// The gallery, threshold and copy command of a `qscorer report` page. Everything comes from the
// JSON block #report-data; names and paths are only ever set as text, never parsed as HTML.
(() => {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const images = data.images; // sorted by score, lowest first
  const slider = document.getElementById("threshold-slider");
  const box = document.getElementById("threshold-input");
  const passCount = document.getElementById("pass-count");
  const sortToggle = document.getElementById("sort-toggle");
  const gallery = document.getElementById("gallery");
  const command = document.getElementById("command");
  const dest = document.getElementById("dest-input");
  const copyButton = document.getElementById("copy-command");
  const histogram = document.getElementById("histogram");
  const belowShade = document.getElementById("histogram-below");
  const thresholdLine = document.getElementById("histogram-threshold");

  const formatScore = (score) => score.toFixed(3);

  function makeCard(image) {
    const card = document.createElement("li");
    card.className = "card";
    const frame = document.createElement(image.href ? "a" : "div");
    frame.className = "frame";
    if (image.href) {
      frame.href = image.href;
      frame.target = "_blank";
      frame.rel = "noopener";
    }
    const label = `${image.name}, score ${formatScore(image.score)}`;
    if (image.thumb) {
      const img = document.createElement("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.width = image.width;
      img.height = image.height;
      img.alt = label;
      img.src = image.thumb;
      frame.append(img);
    } else {
      const missing = document.createElement("div");
      missing.className = "no-preview";
      missing.setAttribute("role", "img");
      missing.setAttribute("aria-label", `${label} (no preview)`);
      missing.textContent = "no preview";
      missing.title = image.note || "";
      frame.append(missing);
    }
    const caption = document.createElement("div");
    caption.className = "caption";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = formatScore(image.score);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = image.name;
    caption.append(score, name);
    card.append(frame, caption);
    card.title = image.path; // the full path on hover
    return card;
  }

  // Cards are made as the gallery scrolls into view, CHUNK at a time, so that a page of ten
  // thousand images opens, re-sorts and re-thresholds as fast as one of a few hundred.
  const CHUNK = 200;
  const cards = new Array(images.length); // by score rank; made on first display
  let descending = false;
  let shown = 0; // cards in the gallery, in display order
  let firstPassing = 0; // rank of the first image at or above the threshold

  const rankAt = (position) => (descending ? images.length - 1 - position : position);

  function showMore() {
    const fragment = document.createDocumentFragment();
    const end = Math.min(images.length, shown + CHUNK);
    for (; shown < end; shown++) {
      const rank = rankAt(shown);
      if (!cards[rank]) cards[rank] = makeCard(images[rank]);
      cards[rank].classList.toggle("below", rank < firstPassing);
      fragment.append(cards[rank]);
    }
    gallery.append(fragment);
  }

  function showFromStart() {
    gallery.replaceChildren();
    shown = 0;
    showMore();
    sortToggle.textContent = descending ? "Highest score first" : "Lowest score first";
    sortToggle.setAttribute("aria-pressed", String(descending));
  }

  // More cards whenever the end of the gallery comes within two window heights.
  const sentinel = document.getElementById("gallery-end");
  const observer = new IntersectionObserver((entries) => {
    if (!entries.some((entry) => entry.isIntersecting) || shown >= images.length) return;
    showMore();
    observer.unobserve(sentinel); // observed afresh, it reports again while the end is still near
    observer.observe(sentinel);
  }, { rootMargin: "0px 0px 200% 0px" });

  // Index of the first image whose score is >= threshold (scores are sorted ascending).
  function firstAtLeast(threshold) {
    let low = 0;
    let high = images.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (images[middle].score < threshold) low = middle + 1;
      else high = middle;
    }
    return low;
  }

  // The shell quoting of Python's shlex.quote.
  function shellQuote(word) {
    if (word === "") return "''";
    if (/^[\w@%+=:,./-]+$/.test(word)) return word;
    return `'${word.replace(/'/g, "'\"'\"'")}'`;
  }

  function updateCommand(threshold) {
    command.textContent = `${data.command}${threshold} --dest ${shellQuote(dest.value.trim() || "kept")}`;
  }

  function updateHistogram(threshold) {
    const [low, high, left, right] = ["low", "high", "left", "right"].map((key) => Number(histogram.dataset[key]));
    const fraction = Math.min(1, Math.max(0, (threshold - low) / (high - low)));
    const x = left + fraction * (right - left);
    belowShade.setAttribute("width", String(x - left));
    thresholdLine.setAttribute("x1", String(x));
    thresholdLine.setAttribute("x2", String(x));
  }

  let current = String(Number(data.threshold));

  // Apply a threshold typed or slid by the user; text that is not a number is ignored.
  function setThreshold(text, source) {
    if (text.trim() === "" || !Number.isFinite(Number(text))) return;
    const threshold = Number(text);
    current = String(threshold); // the shortest decimal that round-trips: what `filter` parses
    const first = firstAtLeast(threshold);
    for (let i = Math.min(first, firstPassing); i < Math.max(first, firstPassing); i++) {
      if (cards[i]) cards[i].classList.toggle("below", i < first);
    }
    firstPassing = first;
    const passed = images.length - first;
    const percent = images.length ? ((100 * passed) / images.length).toFixed(1) : "0.0";
    passCount.textContent = `${passed} of ${images.length} pass (${percent}%), ${first} below`;
    if (source !== slider) slider.value = current;
    if (source !== box) box.value = current;
    updateCommand(current);
    updateHistogram(threshold);
  }

  slider.addEventListener("input", () => setThreshold(slider.value, slider));
  box.addEventListener("input", () => setThreshold(box.value, box));
  dest.addEventListener("input", () => updateCommand(current));
  sortToggle.addEventListener("click", () => {
    descending = !descending;
    showFromStart();
  });
  copyButton.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(command.textContent);
    } catch {
      window.getSelection().selectAllChildren(command);
      document.execCommand("copy");
    }
    copyButton.textContent = "Copied";
    setTimeout(() => { copyButton.textContent = "Copy command"; }, 1500);
  });

  setThreshold(data.threshold, null);
  showFromStart();
  observer.observe(sentinel);
  performance.mark("gallery-ready"); // what benchmarks/bench_report.py times
  document.body.dataset.ready = "true";
})();
