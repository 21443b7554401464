/* spop.js: screen pops in a browser page, from an spop hub. No dependencies, no build step.
 *
 *   <script src="http://127.0.0.1:6080/spop.js"></script>
 *   <script>
 *     spop.signIn({ token: "listener-token" }).then(function () {
 *       spop.listen({
 *         media: "telephone", resource: "13579",
 *         onPop: function (pop) { console.log(pop.source, pop.queue_name, pop.contact_data); },
 *         onContactChanged: function (change) { console.log(change.change, change.answered_by); },
 *         onStatus: function (status) { console.log(status); }   // "Up", "Reconnecting", ...
 *       });
 *     });
 *   </script>
 *
 * The hub keeps each pop until this page acknowledges it (after onPop returned), and sends it
 * again after a dropped stream; spop.js drops the copies it has already handled, so onPop is
 * called once per pop within the hub's pop_ttl. See docs/browser.md.
 */
(function (root) {
  "use strict";

  var here = (typeof document !== "undefined" && document.currentScript) || null;
  // one ack request holds ids up to this many characters (about 450 generated ids): under the
  // hub's 64 KiB body limit even at 3 UTF-8 bytes a character, whatever max_inflight lets a
  // replay burst hold; the rest go in the next request
  var ACK_CHARS = 16000;
  var DEFAULT_HUB = here && here.src ? new URL(here.src, location.href).origin : location.origin;
  var STATUS = {
    CONNECTING: "Connecting",
    UP: "Up",
    RECONNECTING: "Reconnecting",
    SIGNED_OUT: "Signed out",
    CLOSED: "Closed",
  };

  function hubOf(options) {
    return String((options && options.hub) || DEFAULT_HUB).replace(/\/+$/, "");
  }

  function request(hub, method, path, body, csrf) {
    var headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (csrf) headers["X-Spop-CSRF"] = csrf;
    return fetch(hub + path, {
      method: method,
      credentials: "include",
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    }).then(function (response) {
      return response
        .json()
        .catch(function () {
          return {};
        })
        .then(function (data) {
          if (!response.ok) {
            var error = new Error(data.message || "HTTP " + response.status);
            error.status = response.status;
            error.code = data.error;
            throw error;
          }
          return data;
        });
    });
  }

  /* Sign in with the listener token: the hub answers with an HttpOnly cookie (the token is
   * never put in a URL, and the page's scripts never see the session). */
  function signIn(options) {
    return request(hubOf(options), "POST", "/v1/browser/session", { token: options.token || "" });
  }

  /* The current session (csrf token, heartbeat, pop_ttl, panel buttons), or a 401 error. */
  function session(options) {
    return request(hubOf(options), "GET", "/v1/browser/session");
  }

  function signOut(options) {
    var hub = hubOf(options);
    return session(options).then(function (s) {
      return request(hub, "DELETE", "/v1/browser/session", undefined, s.csrf);
    });
  }

  /* Ids already handled in this tab, kept for pop_ttl (sessionStorage survives a reload). */
  function Seen(hub, ttl) {
    this.key = "spop.seen " + hub;
    this.ttl = ttl;
    this.ids = {};
    try {
      this.ids = JSON.parse(sessionStorage.getItem(this.key) || "{}") || {};
    } catch (e) {
      this.ids = {};
    }
  }
  Seen.prototype.has = function (id) {
    var until = this.ids[id];
    return until !== undefined && until > Date.now();
  };
  Seen.prototype.add = function (id) {
    var now = Date.now();
    this.ids[id] = now + this.ttl * 1000;
    for (var k in this.ids) if (this.ids[k] <= now) delete this.ids[k];
    try {
      sessionStorage.setItem(this.key, JSON.stringify(this.ids));
    } catch (e) {
      /* storage full or disabled: dedupe in memory only */
    }
  };

  function asList(value) {
    if (value === undefined || value === null || value === "") return [];
    return Array.isArray(value) ? value.map(String) : [String(value)];
  }

  /* Listen for pops of one media and one or more resources. Returns {close(), status()}. */
  function listen(options) {
    var hub = hubOf(options);
    var media = String(options.media || "telephone");
    var resources = asList(options.resource);
    if (!resources.length) throw new Error("spop.listen: name a resource");
    var onPop = options.onPop || function () {};
    var onChange = options.onContactChanged || function () {};
    var onStatus = options.onStatus || function () {};
    var maxDelay = (options.reconnectingInterval || 30) * 1000;

    var status = null;
    var source = null;
    var csrf = "";
    var heartbeat = 10;
    var seen = null;
    var lastId = "";
    var closed = false;
    var delay = 250;
    var retryTimer = null;
    var watchdog = null;
    var toAck = [];
    var acking = false;
    var chain = Promise.resolve(); // callbacks run one at a time, in order

    function setStatus(next, detail) {
      if (next === status) return;
      status = next;
      try {
        onStatus(next, detail);
      } catch (e) {
        console.error("spop onStatus failed", e);
      }
    }

    function streamUrl() {
      var query = ["media=" + encodeURIComponent(media)];
      resources.forEach(function (r) {
        query.push("resource=" + encodeURIComponent(r));
      });
      if (lastId) query.push("last_event_id=" + encodeURIComponent(lastId));
      return hub + "/v1/browser/stream?" + query.join("&");
    }

    function start() {
      if (closed) return;
      session({ hub: hub }).then(
        function (s) {
          if (closed) return;
          csrf = s.csrf;
          heartbeat = s.heartbeat || heartbeat;
          if (!seen) seen = new Seen(hub, s.pop_ttl || 120);
          open();
        },
        function (error) {
          if (closed) return;
          if (error.status === 401) {
            setStatus(STATUS.SIGNED_OUT, error.message);
          } else {
            retry();
          }
        }
      );
    }

    function open() {
      source = new EventSource(streamUrl(), { withCredentials: true });
      source.addEventListener("ready", function () {
        delay = 250;
        setStatus(STATUS.UP);
        pet();
        flushAcks();
      });
      source.addEventListener("ping", pet);
      source.addEventListener("pop", function (event) {
        pet();
        handle(event, onPop);
      });
      source.addEventListener("change", function (event) {
        pet();
        handle(event, onChange);
      });
      source.onerror = function () {
        if (closed) return;
        if (source && source.readyState === EventSource.CLOSED) {
          // refused (401, 403, 400) or the hub gone for good: after a backoff, ask the
          // session again (Signed out when it is gone), then open a new stream
          retry();
          return;
        }
        // the browser reconnects by itself, sending Last-Event-ID
        setStatus(STATUS.RECONNECTING);
      };
    }

    function drop() {
      if (source) source.close();
      source = null;
      clearTimeout(watchdog);
    }

    function retry() {
      drop();
      setStatus(STATUS.RECONNECTING);
      clearTimeout(retryTimer);
      var wait = delay * (0.5 + Math.random() / 2);
      delay = Math.min(delay * 2, maxDelay);
      retryTimer = setTimeout(start, wait);
    }

    /* A stream silent for three heartbeats is dead (the Python listener's rule). */
    function pet() {
      clearTimeout(watchdog);
      watchdog = setTimeout(function () {
        if (!closed) retry();
      }, heartbeat * 3000);
    }

    function handle(event, callback) {
      var id = event.lastEventId;
      if (id) lastId = id;
      var body;
      try {
        body = JSON.parse(event.data);
      } catch (e) {
        console.error("spop: unreadable event", e);
        return;
      }
      id = String(body.id || id);
      chain = chain.then(function () {
        if (closed) return;
        if (seen.has(id)) {
          ack(id); // shown already: the earlier ack was lost with the stream
          return;
        }
        seen.add(id);
        var done;
        try {
          done = Promise.resolve(callback(body));
        } catch (e) {
          console.error("spop callback failed", e);
          done = Promise.resolve();
        }
        return done
          .catch(function (e) {
            console.error("spop callback failed", e);
          })
          .then(function () {
            ack(id);
          });
      });
    }

    function ack(id) {
      toAck.push(id);
      flushAcks();
    }

    function flushAcks() {
      if (acking || !toAck.length || !csrf) return;
      acking = true;
      var n = 0;
      for (var size = 0; n < toAck.length && (n === 0 || size + toAck[n].length + 3 <= ACK_CHARS); n++) {
        size += toAck[n].length + 3; // "id",
      }
      var ids = toAck.splice(0, n);
      request(hub, "POST", "/v1/browser/ack", { media: media, resource: resources, ids: ids }, csrf).then(
        function () {
          acking = false;
          flushAcks();
        },
        function (error) {
          acking = false;
          toAck = ids.concat(toAck);
          if (error.status === 403 && error.code === "csrf") {
            // signed in again (another tab): same cookie, a new session and CSRF token
            session({ hub: hub }).then(function (s) {
              if (s.csrf !== csrf) {
                csrf = s.csrf;
                flushAcks();
              }
            }, function () {});
          }
          // else the hub is unreachable: the ids go out again once the stream is Up
        }
      );
    }

    setStatus(STATUS.CONNECTING);
    start();
    return {
      close: function () {
        closed = true;
        clearTimeout(retryTimer);
        drop();
        setStatus(STATUS.CLOSED);
      },
      status: function () {
        return status;
      },
    };
  }

  root.spop = {
    signIn: signIn,
    signOut: signOut,
    session: session,
    listen: listen,
    STATUS: STATUS,
    hub: DEFAULT_HUB,
  };
})(typeof window !== "undefined" ? window : this);
