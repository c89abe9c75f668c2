/* qgmil slide viewer: one slide's Deep Zoom pyramid in OpenSeadragon, one panel per run side by side (their
 * viewports kept in step), each run's attention layers as image overlays, the most attended tiles listed.
 *
 * Input: window.QGMIL_PAGE, written into the page by qgmil.explain.viewer (see build_page there).
 * Output: window.qgmilViewer, the page's state and controls for scripts and tests (state(), setLayer(),
 * setScale(), setOpacity(), goToTile(), imageToPage(), isReady(), errors).
 *
 * Nothing is fetched but the page's own files: the pyramid's descriptor comes inline (a page opened from
 * file:// may not fetch files; images it may load), tiles and overlays are <img> loads, the buttons are the
 * vendored OpenSeadragon images.
 */
(function () {
  "use strict";
  const page = window.QGMIL_PAGE;
  const OSD = window.OpenSeadragon;
  const errors = [];
  const state = { scale: page.defaults.scale, opacity: page.defaults.opacity };

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text; // text, never HTML: ids and names come from the data
    return node;
  }

  // --- header: navigation, the slide and its label --------------------------------------------------
  const nav = document.getElementById("qgmil-nav");
  nav.append(el("a", { href: page.links.index }, "all slides"));
  if (page.links.previous) nav.append(el("a", { href: page.links.previous.href, id: "qgmil-previous" }, "\u2190 " + page.links.previous.name));
  if (page.links.next) nav.append(el("a", { href: page.links.next.href, id: "qgmil-next" }, page.links.next.name + " \u2192"));
  const meta = [];
  if (page.slide.bag_id !== page.slide.id) meta.push("bag " + page.slide.bag_id);
  meta.push("label: " + (page.slide.label === null ? "unknown" : page.slide.label));
  meta.push(page.slide.width + " \u00d7 " + page.slide.height + " px" + (page.slide.mpp ? " at " + page.slide.mpp.toFixed(3) + " \u00b5m/px" : ""));
  meta.push(page.slide.tiles + " tiles of " + page.slide.patch + " px");
  document.getElementById("qgmil-meta").textContent = meta.join(" \u00b7 ");

  // --- controls shared by the panels: opacity, scale --------------------------------------------------
  const controls = document.getElementById("qgmil-controls");
  const opacityLabel = el("label", {}, "overlay opacity ");
  const opacity = el("input", { type: "range", min: "0", max: "1", step: "0.05", id: "qgmil-opacity" });
  opacity.value = String(state.opacity);
  opacity.addEventListener("input", () => setOpacity(Number(opacity.value)));
  opacityLabel.append(opacity);
  controls.append(opacityLabel);
  const scaleLabel = el("label", {}, "scale ");
  const scaleSelect = el("select", { id: "qgmil-scale" });
  scaleSelect.append(el("option", { value: "rank" }, "rank in the bag (percentile)"));
  scaleSelect.append(el("option", { value: "raw" }, "raw attention weight"));
  scaleSelect.value = state.scale;
  scaleSelect.addEventListener("change", () => setScale(scaleSelect.value));
  scaleLabel.append(scaleSelect);
  controls.append(scaleLabel);
  controls.append(el("span", {}, "click a tile in a list to go to it; the panels move together"));

  const gradient = "linear-gradient(to right, " +
    page.colormap.map(([at, rgb]) => "rgb(" + rgb.join(",") + ") " + (100 * at).toFixed(1) + "%").join(", ") + ")";

  function formatWeight(v) {
    return v === 0 ? "0" : Math.abs(v) >= 0.01 ? v.toFixed(3) : v.toExponential(2);
  }

  // --- one panel per run -------------------------------------------------------------------------------
  const panelsNode = document.getElementById("qgmil-panels");
  // every panel's DOM first, then the viewers: a viewer made before its neighbours exist would open at the
  // page's full width and keep that zoom when the row shares out the width
  const panels = page.panels.map((spec, index) => buildPanel(spec, index));
  panels.forEach(openViewer);

  function buildPanel(spec, index) {
    const node = el("div", { class: "qgmil-panel", id: "qgmil-panel-" + index });
    const head = el("div", { class: "qgmil-panel-head" });
    head.append(el("h2", {}, spec.name));
    const verdict = spec.predicted !== null && page.slide.label !== null
      ? (spec.predicted === page.slide.label ? " qgmil-right" : " qgmil-wrong") : "";
    head.append(el("span", { class: "qgmil-prediction" + verdict }, "predicted: " + spec.prediction));
    const layerLabel = el("label", {}, "layer ");
    const select = el("select", { class: "qgmil-layer" });
    select.append(el("option", { value: "" }, "none (slide only)"));
    for (const layer of spec.layers) select.append(el("option", { value: layer.key }, layer.name));
    layerLabel.append(select);
    head.append(layerLabel);
    const legend = el("span", { class: "qgmil-legend" });
    const low = el("span", { class: "qgmil-low" });
    const bar = el("span", { class: "qgmil-bar" });
    bar.style.background = gradient;
    const high = el("span", { class: "qgmil-high" });
    legend.append(low, bar, high);
    head.append(legend);
    const osdNode = el("div", { class: "qgmil-osd", id: "qgmil-osd-" + index });
    const topTitle = el("div", { class: "qgmil-top-title" });
    const top = el("ol", { class: "qgmil-top" });
    node.append(head, osdNode, topTitle, top);
    panelsNode.append(node);
    const panel = { spec, index, node, osdNode, viewer: null, select, low, high, top, topTitle, overlays: {},
                    layer: spec.layers.length ? spec.layers[0].key : null, mark: null, opened: false };
    select.addEventListener("change", () => setLayer(index, select.value || null));
    select.value = panel.layer || "";
    renderLegendAndTop(panel);
    return panel;
  }

  function openViewer(panel) {
    const index = panel.index, spec = panel.spec;
    const viewer = panel.viewer = OSD({
      element: panel.osdNode,
      prefixUrl: page.osd_images,
      tileSources: page.slide.tile_source,
      // canvas, not WebGL: WebGL may not upload images of a file:// page (each file is its own origin)
      drawer: "canvas",
      showNavigator: index === 0,
      navigatorPosition: "BOTTOM_RIGHT",
      animationTime: 0.4,
      maxZoomPixelRatio: 2,
      visibilityRatio: 0.5,
      gestureSettingsMouse: { clickToZoom: false },
    });
    viewer.addHandler("open-failed", (e) => errors.push("open-failed: " + (e.message || "")));
    viewer.addHandler("tile-load-failed", (e) => errors.push("tile-load-failed: " + (e.message || "") + " " + (e.tile && e.tile.getUrl ? e.tile.getUrl() : "")));

    viewer.addOnceHandler("open", () => {
      panel.opened = true;
      // OpenSeadragon sets an overlay's display on every frame: layers are shown and hidden by visibility
      for (const layer of spec.layers) {
        const img = el("img", { class: "qgmil-overlay", alt: layer.name, "data-layer": layer.key });
        img.addEventListener("error", () => errors.push("overlay-load-failed: " + img.src));
        img.style.opacity = String(state.opacity);
        img.style.visibility = "hidden";
        img.src = layer.images[state.scale];
        const [x, y, w, h] = layer.rect; // level-0 px: the heat's own extent (a whole number of heat pixels)
        viewer.addOverlay({ element: img, location: viewer.viewport.imageToViewportRectangle(x, y, w, h) });
        panel.overlays[layer.key] = img;
      }
      panel.mark = el("div", { class: "qgmil-mark" });
      panel.mark.style.visibility = "hidden";
      viewer.addOverlay({ element: panel.mark, location: new OSD.Rect(0, 0, 0, 0) });
      showLayer(panel, panel.layer);
      const leader = panels.find((p) => p !== panel && p.opened); // opened later: start where the others are
      if (leader) {
        viewer.viewport.zoomTo(leader.viewer.viewport.getZoom(false), null, true);
        viewer.viewport.panTo(leader.viewer.viewport.getCenter(false), true);
      }
    });
  }

  function layerOf(panel, key) {
    return panel.spec.layers.find((l) => l.key === key) || null;
  }

  function showLayer(panel, key) {
    panel.layer = key;
    panel.select.value = key || "";
    for (const [k, img] of Object.entries(panel.overlays)) img.style.visibility = k === key ? "visible" : "hidden";
    renderLegendAndTop(panel);
  }

  function renderLegendAndTop(panel) {
    const layer = layerOf(panel, panel.layer);
    panel.top.textContent = "";
    if (!layer) {
      panel.low.textContent = panel.high.textContent = "";
      panel.topTitle.textContent = "";
      return;
    }
    const [lo, hi] = layer.range[state.scale];
    panel.low.textContent = state.scale === "rank" ? "least attended" : formatWeight(lo);
    panel.high.textContent = state.scale === "rank" ? "most attended" : formatWeight(hi);
    panel.topTitle.textContent = "most attended tiles of " + layer.name + " (rank in the bag, weight, level-0 x, y):";
    layer.top.forEach((tile, i) => {
      const item = el("li", { "data-tile": String(tile.tile) },
        "#" + tile.rank + "  " + formatWeight(tile.weight) + "  (" + Math.round(tile.x) + ", " + Math.round(tile.y) + ")");
      item.addEventListener("click", () => goToTile(panel.index, i));
      panel.top.append(item);
    });
  }

  // --- keeping the panels in step -------------------------------------------------------------------
  // The panel that moves leads: the others take its zoom and centre at once. A follower then reports the
  // change as its own viewport-change, one frame later; that echo (its view is what we set) is ignored, or it
  // would set the leader back a frame and stop its animation.
  function near(a, b) {
    return Math.abs(a - b) <= 1e-9 * Math.max(1, Math.abs(a), Math.abs(b));
  }
  for (const panel of panels) {
    panel.viewer.addHandler("viewport-change", () => {
      const vp = panel.viewer.viewport;
      const zoom = vp.getZoom(true), center = vp.getCenter(true);
      const set = panel.synced;
      if (set && near(set.zoom, zoom) && near(set.x, center.x) && near(set.y, center.y)) return;
      panel.synced = null;
      for (const other of panels) {
        if (other === panel || !other.opened) continue;
        other.synced = { zoom, x: center.x, y: center.y };
        other.viewer.viewport.zoomTo(zoom, null, true);
        other.viewer.viewport.panTo(center, true);
      }
    });
  }

  // --- the API -------------------------------------------------------------------------------------------
  function setLayer(panelIndex, key) {
    const panel = panels[panelIndex];
    if (key !== null && !layerOf(panel, key)) throw new Error("no layer " + key + " in panel " + panelIndex);
    showLayer(panel, key);
  }

  function setScale(scale) {
    if (!page.scales.includes(scale)) throw new Error("no scale " + scale);
    state.scale = scale;
    scaleSelect.value = scale;
    for (const panel of panels) {
      for (const layer of panel.spec.layers) if (panel.overlays[layer.key]) panel.overlays[layer.key].src = layer.images[scale];
      renderLegendAndTop(panel);
    }
  }

  function setOpacity(value) {
    state.opacity = Math.min(1, Math.max(0, Number(value)));
    opacity.value = String(state.opacity);
    for (const panel of panels) for (const img of Object.values(panel.overlays)) img.style.opacity = String(state.opacity);
  }

  function goToTile(panelIndex, i, immediately) {
    const panel = panels[panelIndex];
    const layer = layerOf(panel, panel.layer);
    if (!layer || !layer.top[i]) throw new Error("no tile " + i + " in the list of panel " + panelIndex);
    const tile = layer.top[i];
    const vp = panel.viewer.viewport;
    const margin = 2 * tile.size; // the tile and two tiles around it
    vp.fitBounds(vp.imageToViewportRectangle(tile.x - margin, tile.y - margin, tile.size + 2 * margin, tile.size + 2 * margin), !!immediately);
    for (const p of panels) {
      if (!p.mark) continue;
      p.viewer.updateOverlay(p.mark, p.viewer.viewport.imageToViewportRectangle(tile.x, tile.y, tile.size, tile.size));
      p.mark.style.visibility = "visible";
    }
    panel.top.querySelectorAll("li").forEach((li, j) => li.classList.toggle("qgmil-current", j === i));
    return tile;
  }

  function imageToPage(panelIndex, x, y) {
    const viewer = panels[panelIndex].viewer;
    const point = viewer.viewport.imageToViewerElementCoordinates(new OSD.Point(x, y));
    const box = viewer.element.getBoundingClientRect();
    return { x: box.left + point.x, y: box.top + point.y };
  }

  function settled(viewer) {
    const vp = viewer.viewport;
    const a = vp.getCenter(true), b = vp.getCenter(false);
    return Math.abs(vp.getZoom(true) - vp.getZoom(false)) < 1e-9 && Math.abs(a.x - b.x) < 1e-9 && Math.abs(a.y - b.y) < 1e-9;
  }

  function isReady() {
    return panels.every((p) => {
      if (!p.opened || p.viewer.world.getItemCount() < 1 || !p.viewer.world.getItemAt(0).getFullyLoaded()) return false;
      const img = p.overlays[p.layer];
      return settled(p.viewer) && (!img || (img.complete && img.naturalWidth > 0));
    });
  }

  function state_() {
    return {
      scale: state.scale,
      opacity: state.opacity,
      slide: page.slide.id,
      panels: panels.map((p) => {
        const vp = p.viewer.viewport;
        const bounds = p.opened ? vp.viewportToImageRectangle(vp.getBounds(true)) : null;
        const center = p.opened ? vp.viewportToImageCoordinates(vp.getCenter(true)) : null;
        return {
          name: p.spec.name,
          layer: p.layer,
          layers: p.spec.layers.map((l) => ({ key: l.key, name: l.name, branch: l.branch, visible: l.key === p.layer,
                                              src: p.overlays[l.key] ? p.overlays[l.key].getAttribute("src") : null })),
          zoom: p.opened ? vp.getZoom(true) : null,
          center: center && { x: center.x, y: center.y },
          bounds: bounds && { x: bounds.x, y: bounds.y, width: bounds.width, height: bounds.height },
        };
      }),
    };
  }

  window.qgmilViewer = {
    page, panels, errors,
    viewers: panels.map((p) => p.viewer),
    state: state_, setLayer, setScale, setOpacity, goToTile, imageToPage, isReady,
  };
})();
