// Refreshes the overview: fetches its server-rendered fragment every few seconds.
(function () {
  "use strict";
  var box = document.getElementById("overview");
  if (!box) { return; }
  var every = parseInt(box.getAttribute("data-refresh"), 10) || 2000;
  function refresh() {
    fetch(box.getAttribute("data-src"), {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { box.innerHTML = html; box.removeAttribute("data-stale"); })
      .catch(function () { box.setAttribute("data-stale", "1"); })
      .then(function () { setTimeout(refresh, every); });
  }
  setTimeout(refresh, every);
}());
