"use strict";
// The viewer of one diagnosis: reads the inline JSON, shows each series' axial slices (PNGs beside the page),
// windows them with an SVG lookup table, and draws findings and annotated nodules on the slices they span.
(function () {
  const data = JSON.parse(document.getElementById("viewer-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";
  const VIEW_WIDTH_PX = 620;
  const MIN_MARK_RADIUS_PX = 3;
  const FINDING_MARGIN_MM = 2;  // circles just outside the nodule, so that the nodule mask does not hide them
  const TRUTH_MARGIN_MM = 4;
  const el = (id) => document.getElementById(id);
  const state = { series: null, slice: 0, window: "lung", selected: null };

  // Lookup table of a window (centre, width) over the 256 codes of the slices (slices.py: CODE_SEGMENTS).
  function codeToHu(code) {
    for (const [first, end, low, high] of data.code_segments) {
      if (code >= first && code < end) return low + (code - first + 0.5) * (high - low) / (end - first);
    }
    return NaN;
  }
  function windowTable(centre, width) {
    const values = [];
    for (let code = 0; code < 256; code++) {
      const v = (codeToHu(code) - (centre - width / 2)) / width;
      values.push(Math.min(1, Math.max(0, v)).toFixed(4));
    }
    return values.join(" ");
  }
  function setWindow(name) {
    const [centre, width] = data.windows[name];
    const table = windowTable(centre, width);
    for (const func of document.querySelectorAll("#window-filter feComponentTransfer > *")) {
      func.setAttribute("tableValues", table);
    }
    state.window = name;
    for (const button of document.querySelectorAll("[data-window]")) {
      button.classList.toggle("active", button.dataset.window === name);
    }
  }

  function fmt(value, digits) {
    return value === null || value === undefined ? "n/a" : value.toFixed(digits);
  }
  function xyzText(xyz) {
    return xyz.map((v) => v.toFixed(1)).join(", ");
  }
  function sliceOf(item) {
    return Math.min(state.series.shape[0] - 1, Math.max(0, Math.round(item.irc[0])));
  }
  function sliceUrl(kind, index) {
    return `${state.series.folder}/${kind}${String(index).padStart(4, "0")}.png`;
  }

  // Cross-section radius (mm) of a sphere of `diameter` centred at `index` on slice `slice`, or null off it;
  // the centre slice always shows it (a small nodule between slices).
  function crossSection(item, slice) {
    const radius = item.diameter_mm / 2;
    const dz = Math.abs(slice - item.irc[0]) * state.series.spacing[0];
    if (slice === sliceOf(item)) return Math.sqrt(Math.max(radius * radius - dz * dz, 0)) || radius;
    return dz <= radius ? Math.sqrt(radius * radius - dz * dz) : null;
  }

  function ellipse(item, radiusMm, cls) {
    const [, rowSpacing, colSpacing] = state.series.spacing;
    const mark = document.createElementNS(SVG, "ellipse");
    const minimum = MIN_MARK_RADIUS_PX * state.series.shape[2] / VIEW_WIDTH_PX;
    mark.setAttribute("cx", item.irc[2] + 0.5);
    mark.setAttribute("cy", item.irc[1] + 0.5);
    mark.setAttribute("rx", Math.max(radiusMm / colSpacing, minimum));
    mark.setAttribute("ry", Math.max(radiusMm / rowSpacing, minimum));
    mark.setAttribute("class", cls);
    mark.setAttribute("vector-effect", "non-scaling-stroke");
    return mark;
  }
  function label(item, radiusMm, text, cls) {
    const node = document.createElementNS(SVG, "text");
    const [, rowSpacing, colSpacing] = state.series.spacing;
    node.setAttribute("x", item.irc[2] + radiusMm / colSpacing + 3);
    node.setAttribute("y", item.irc[1] - radiusMm / rowSpacing);
    node.setAttribute("font-size", String(state.series.shape[2] / 38));
    node.setAttribute("class", cls);
    node.setAttribute("vector-effect", "non-scaling-stroke");
    node.textContent = text;
    return node;
  }

  function drawMarks() {
    const marks = el("marks");
    marks.replaceChildren();
    const slice = state.slice;
    if (el("show-truth").checked && state.series.truth) {
      for (const nodule of state.series.truth) {
        const radius = crossSection(nodule, slice);
        if (radius === null) continue;
        const status = nodule.finding > 0 ? "found" : "missed";
        marks.append(ellipse(nodule, radius + TRUTH_MARGIN_MM, `mark-truth ${status}`));
        marks.append(label(nodule, -nodule.diameter_mm - TRUTH_MARGIN_MM, `T${nodule.number} ${status}`,
                           `mark-label truth-${status}`));
      }
    }
    if (el("show-findings").checked) {
      for (const finding of state.series.findings) {
        const radius = crossSection(finding, slice);
        if (radius === null) continue;
        const selected = state.selected === finding.number;
        marks.append(ellipse(finding, radius + FINDING_MARGIN_MM, "mark-finding" + (selected ? " selected" : "")));
        marks.append(label(finding, radius + FINDING_MARGIN_MM, `#${finding.number} ${finding.probability.toFixed(2)}`,
                           "mark-label"));
      }
    }
  }

  function showOverlay(image, kind, available, checkbox) {
    const shown = checkbox.checked && available.has(state.slice);
    image.style.display = shown ? "" : "none";
    if (shown) image.src = sliceUrl(kind, state.slice);
  }

  function setSlice(index) {
    const series = state.series;
    index = Math.min(series.shape[0] - 1, Math.max(0, index | 0));
    state.slice = index;
    el("slice").value = String(index);
    el("ct").src = sliceUrl("ct", index);
    showOverlay(el("lung-overlay"), "lung", series.lungSet, el("show-lung"));
    showOverlay(el("nodule-overlay"), "nodule", series.noduleSet, el("show-nodule"));
    const z = series.z_mm ? ` · z ${series.z_mm[index].toFixed(1)} mm` : "";
    el("slice-label").textContent = `slice ${index} / ${series.shape[0] - 1}${z}`;
    drawMarks();
    for (const step of [1, -1, 2, -2]) {  // the next slices, so that scrolling does not wait for them
      const next = index + step;
      if (next >= 0 && next < series.shape[0]) new Image().src = sliceUrl("ct", next);
    }
  }

  function select(number, table) {
    state.selected = table === "findings" ? number : null;
    for (const row of document.querySelectorAll("#findings tbody tr, #truth tbody tr")) {
      row.classList.toggle("selected", row.dataset.table === table && Number(row.dataset.number) === number);
    }
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.append(td);
  }

  function fillTables() {
    const series = state.series;
    const body = el("findings").tBodies[0];
    body.replaceChildren();
    const findings = [...series.findings].sort((a, b) => b.probability - a.probability);
    for (const finding of findings) {
      const row = document.createElement("tr");
      Object.assign(row.dataset, { table: "findings", number: finding.number, slice: sliceOf(finding),
                                   probability: finding.probability });
      cell(row, `#${finding.number}`);
      cell(row, finding.probability.toFixed(3));
      const malignant = finding.malignancy !== null && finding.malignancy >= data.malignancy_threshold;
      cell(row, fmt(finding.malignancy, 3), malignant ? "malignant" : "");
      cell(row, finding.diameter_mm.toFixed(1));
      cell(row, xyzText(finding.xyz));
      cell(row, String(sliceOf(finding)));
      row.addEventListener("click", () => { select(finding.number, "findings"); setSlice(sliceOf(finding)); });
      body.append(row);
    }
    el("no-findings").hidden = findings.length > 0;
    el("findings-count").textContent = `(${findings.length}, nodule p ≥ ${data.nodule_threshold})`;
    const truthBody = el("truth").tBodies[0];
    truthBody.replaceChildren();
    el("truth-section").hidden = !series.truth;
    el("show-truth-label").hidden = !series.truth;
    if (series.truth) {
      for (const nodule of series.truth) {
        const row = document.createElement("tr");
        Object.assign(row.dataset, { table: "truth", number: nodule.number, slice: sliceOf(nodule) });
        cell(row, `T${nodule.number}`);
        const status = nodule.finding > 0 ? "found" : "missed";
        cell(row, status, status);
        cell(row, nodule.diameter_mm.toFixed(1));
        cell(row, xyzText(nodule.xyz));
        cell(row, nodule.finding > 0 ? `#${nodule.finding}`
          : (nodule.detected ? `candidate p ${fmt(nodule.probability, 3)} < ${data.nodule_threshold}` : "no candidate"));
        cell(row, String(sliceOf(nodule)));
        row.addEventListener("click", () => { select(nodule.number, "truth"); setSlice(sliceOf(nodule)); });
        truthBody.append(row);
      }
      const found = series.truth.filter((n) => n.finding > 0).length;
      el("truth-count").textContent = `(${found} of ${series.truth.length} found)`;
    }
  }

  function showSeries(number) {
    const series = data.series[number];
    series.lungSet = new Set(series.lung_slices);
    series.noduleSet = new Set(series.nodule_slices);
    state.series = series;
    state.selected = null;
    const [, rows, cols] = series.shape;
    const [, rowSpacing, colSpacing] = series.spacing;
    const view = el("view");
    view.style.width = `${VIEW_WIDTH_PX}px`;
    el("viewer").style.width = `${VIEW_WIDTH_PX}px`;
    view.style.height = `${Math.round(VIEW_WIDTH_PX * rows * rowSpacing / (cols * colSpacing))}px`;
    el("marks").setAttribute("viewBox", `0 0 ${cols} ${rows}`);
    el("slice").max = String(series.shape[0] - 1);
    el("series-info").textContent = `${series.uid} · ${series.source} · ${series.shape.join(" × ")} voxels, ` +
      `${series.spacing.map((v) => v.toFixed(2)).join(" × ")} mm`;
    fillTables();
    const first = series.findings.length ? series.findings[0] : null;
    if (first) select(first.number, "findings");
    setSlice(first ? sliceOf(first) : Math.floor(series.shape[0] / 2));
  }

  function init() {
    el("notice").textContent = data.notice;
    const chooser = el("series");
    data.series.forEach((series, number) => {
      const option = document.createElement("option");
      option.value = String(number);
      option.textContent = `${series.uid} (${series.findings.length} finding${series.findings.length === 1 ? "" : "s"})`;
      chooser.append(option);
    });
    chooser.addEventListener("change", () => showSeries(Number(chooser.value)));
    el("slice").addEventListener("input", () => setSlice(Number(el("slice").value)));
    el("view").addEventListener("wheel", (event) => {
      event.preventDefault();
      setSlice(state.slice + Math.sign(event.deltaY));
    }, { passive: false });
    for (const button of document.querySelectorAll("[data-window]")) {
      button.addEventListener("click", () => setWindow(button.dataset.window));
    }
    for (const id of ["show-lung", "show-nodule", "show-findings", "show-truth"]) {
      el(id).addEventListener("change", () => setSlice(state.slice));
    }
    el("froc-section").hidden = !data.froc;
    if (data.froc) {
      el("froc").hidden = !data.froc.image;
      if (data.froc.image) el("froc").src = data.froc.image;
      el("cpm").textContent = `CPM ${fmt(data.froc.cpm, 3)} (${Math.round(data.froc.confidence * 100)}% CI ` +
        `${fmt(data.froc.ci_low, 3)}–${fmt(data.froc.ci_high, 3)}), ${data.froc.n_detected_nodules} of ` +
        `${data.froc.n_nodules} nodules detected in ${data.froc.n_scans} scan(s)`;
    }
    setWindow("lung");
    if (data.series.length) showSeries(0);
    document.body.dataset.ready = "true";
  }

  init();
})();
