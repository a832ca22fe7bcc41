// lipcert dashboard plots: hand-written SVG (no chart library, nothing from a CDN), and the
// number formatting the dashboard shares. Rows are {radius, correct} per input; an input is
// certified at eps when it is classified correctly (or has no label) and radius > eps.
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";

  function fmt(x, digits) {
    if (x === null || x === undefined || x === "") {
      return "–";
    }
    if (typeof x !== "number") {
      return String(x);
    }
    if (!isFinite(x)) {
      return String(x);
    }
    return Number(x.toPrecision(digits || 5)).toString();
  }

  function pct(x) {
    return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %";
  }

  function certifiedAt(rows, eps) {
    var n = rows.filter(function (r) {
      return r.correct && r.radius > eps;
    }).length;
    return rows.length ? n / rows.length : 0;
  }

  function svgNode(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) {
      node.setAttribute(k, attrs[k]);
    });
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  // Round tick values covering [0, top].
  function ticks(top, count) {
    if (!(top > 0)) {
      return [0];
    }
    var raw = top / count;
    var mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 2.5, 5, 10].map(function (m) { return m * mag; }).filter(function (s) {
      return s >= raw;
    })[0];
    var out = [];
    for (var v = 0; v <= top * (1 + 1e-9); v += step) {
      out.push(Number(v.toPrecision(6)));
    }
    return out;
  }

  function frame(title, desc, width, height) {
    var id = "p" + Math.random().toString(36).slice(2);
    var svg = svgNode("svg", {
      viewBox: "0 0 " + width + " " + height,
      role: "img",
      "aria-labelledby": id + "t " + id + "d",
    });
    svg.appendChild(svgNode("title", { id: id + "t" }, title));
    svg.appendChild(svgNode("desc", { id: id + "d" }, desc));
    return svg;
  }

  function axes(svg, box, xmax, ymax, xlabel, ylabel, yfmt) {
    var sx = function (x) { return box.x + (xmax > 0 ? (x / xmax) * box.w : 0); };
    var sy = function (y) { return box.y + box.h - (ymax > 0 ? (y / ymax) * box.h : 0); };
    ticks(ymax, 4).forEach(function (t) {
      svg.appendChild(svgNode("line", { x1: box.x, x2: box.x + box.w, y1: sy(t), y2: sy(t), class: "grid-line" }));
      svg.appendChild(svgNode("text", { x: box.x - 6, y: sy(t) + 4, "text-anchor": "end" }, yfmt(t)));
    });
    ticks(xmax, 5).forEach(function (t) {
      svg.appendChild(svgNode("line", { x1: sx(t), x2: sx(t), y1: box.y + box.h, y2: box.y + box.h + 4, class: "axis" }));
      svg.appendChild(svgNode("text", { x: sx(t), y: box.y + box.h + 16, "text-anchor": "middle" }, fmt(t, 3)));
    });
    svg.appendChild(svgNode("line", { x1: box.x, x2: box.x + box.w, y1: box.y + box.h, y2: box.y + box.h, class: "axis" }));
    svg.appendChild(svgNode("line", { x1: box.x, x2: box.x, y1: box.y, y2: box.y + box.h, class: "axis" }));
    svg.appendChild(svgNode("text", { x: box.x + box.w / 2, y: box.y + box.h + 32, "text-anchor": "middle" }, xlabel));
    svg.appendChild(
      svgNode("text", { x: 12, y: box.y + box.h / 2, "text-anchor": "middle", transform: "rotate(-90 12 " + (box.y + box.h / 2) + ")" }, ylabel)
    );
    return { sx: sx, sy: sy };
  }

  // Step curve eps -> fraction of inputs correct with radius > eps (right-continuous steps
  // drop at each radius).
  function drawCurve(target, rows, eps, labelled) {
    var W = 560, H = 260, box = { x: 52, y: 12, w: 490, h: 200 };
    var radii = rows.filter(function (r) { return r.correct; }).map(function (r) { return r.radius; }).sort(function (a, b) { return a - b; });
    var xmax = Math.max(radii.length ? radii[radii.length - 1] * 1.08 : 0, eps * 1.2, 1e-12);
    var ylabel = labelled ? "certified accuracy" : "certified fraction";
    var svg = frame(
      "Certified accuracy against epsilon",
      ylabel + " " + pct(certifiedAt(rows, 0)) + " at ε = 0, " + pct(certifiedAt(rows, eps)) + " at ε = " + fmt(eps),
      W, H
    );
    svg.setAttribute("data-points", String(radii.length));
    var s = axes(svg, box, xmax, 1, "ε (l2 radius)", ylabel, function (t) { return Math.round(t * 100) + "%"; });
    var n = rows.length || 1;
    var alive = radii.length;
    var d = "M" + s.sx(0) + "," + s.sy(alive / n);
    radii.forEach(function (r) {
      d += " H" + s.sx(r);
      alive -= 1;
      d += " V" + s.sy(alive / n);
    });
    d += " H" + s.sx(xmax);
    svg.appendChild(svgNode("path", { d: d, class: "curve" }));
    if (eps > 0) {
      svg.appendChild(svgNode("line", { x1: s.sx(eps), x2: s.sx(eps), y1: box.y, y2: box.y + box.h, class: "eps" }));
      svg.appendChild(svgNode("text", { x: s.sx(eps) + 4, y: box.y + 12 }, "ε = " + fmt(eps, 3)));
    }
    target.replaceChildren(svg);
  }

  function drawHistogram(target, rows) {
    var W = 560, H = 240, box = { x: 52, y: 12, w: 490, h: 180 };
    var radii = rows.map(function (r) { return r.radius; });
    var top = Math.max.apply(null, radii.concat([1e-12]));
    var bins = 20, width = top / bins, counts = new Array(bins).fill(0);
    radii.forEach(function (r) {
      counts[Math.min(bins - 1, Math.floor(r / width))] += 1;
    });
    var cmax = Math.max.apply(null, counts.concat([1]));
    var svg = frame("Histogram of certified radii", bins + " bins from 0 to " + fmt(top, 3) + "; largest bin " + cmax + " inputs", W, H);
    var s = axes(svg, box, top, cmax, "certified radius (l2)", "inputs", function (t) { return fmt(t, 3); });
    counts.forEach(function (c, i) {
      if (c > 0) {
        var x0 = s.sx(i * width), x1 = s.sx((i + 1) * width);
        svg.appendChild(svgNode("rect", { x: x0 + 1, y: s.sy(c), width: Math.max(1, x1 - x0 - 2), height: s.sy(0) - s.sy(c), class: "bar" }));
      }
    });
    target.replaceChildren(svg);
  }

  window.LipcertPlots = {
    fmt: fmt,
    pct: pct,
    certifiedAt: certifiedAt,
    curve: drawCurve,
    histogram: drawHistogram,
  };
})();
