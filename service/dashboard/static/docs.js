// Swagger UI for /docs, from the bundle the app serves itself (no CDN, no online validator).
// "Try it out" sends X-API-Key: what was typed into Authorize (kept for the session by
// persistAuthorization), else the key the dashboard keeps in sessionStorage.
(function () {
  "use strict";
  var script = document.currentScript;
  var KEY = "lipcert-api-key";
  window.ui = SwaggerUIBundle({
    url: script.getAttribute("data-openapi"),
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    validatorUrl: null,
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis],
    requestInterceptor: function (req) {
      var key = window.sessionStorage.getItem(KEY);
      var has = Object.keys(req.headers || {}).some(function (h) {
        return h.toLowerCase() === "x-api-key";
      });
      if (key && !has) {
        req.headers["X-API-Key"] = key;
      }
      return req;
    },
  });
})();
