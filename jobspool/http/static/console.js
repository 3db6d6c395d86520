// jobspool console: keep the open page up to date (the page reads fine without this).
// Every few seconds it asks the page's JSON twin (?format=json) for its digest; when the
// digest changed, it fetches the page again and swaps its <main> in, unless the user is
// typing in a form there (then it only says the page is out of date).
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-poll")) || 0;
  if (!seconds || !window.fetch || !window.DOMParser) {
    return;
  }
  var meta = document.querySelector('meta[name="jobspool-digest"]');
  var live = document.getElementById("live");
  var editing = false;
  document.addEventListener("input", function () { editing = true; });

  function twin() {
    var url = new URL(window.location.href);
    url.searchParams.set("format", "json");
    return url.toString();
  }

  function say(text, stale) {
    if (live) {
      live.textContent = text;
      live.classList.toggle("stale", !!stale);
    }
  }

  function swap() {
    return fetch(window.location.href, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        var main = document.getElementById("main");
        var next = fresh.getElementById("main");
        var digest = fresh.querySelector('meta[name="jobspool-digest"]');
        if (main && next) {
          main.replaceChildren.apply(main, Array.prototype.slice.call(next.childNodes));
        }
        if (meta && digest) {
          meta.setAttribute("content", digest.getAttribute("content"));
        }
        say("as of " + new Date().toLocaleTimeString(), false);
      });
  }

  function poll() {
    fetch(twin(), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (body) {
        if (!meta || body.digest === meta.getAttribute("content")) {
          say("as of " + new Date().toLocaleTimeString(), false);
          return null;
        }
        if (editing) {
          say("changed: reload to see it", true);
          return null;
        }
        return swap();
      })
      .catch(function () { say("not updating (server unreachable)", true); })
      .then(function () { window.setTimeout(poll, seconds * 1000); });
  }

  window.setTimeout(poll, seconds * 1000);
})();
