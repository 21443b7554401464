/* The agent panel: sign in, one card per pop following its contact, buttons from URL templates. */
(function () {
  "use strict";

  var MAX_CARDS = 20;
  var STORE = "spop.panel.cards";
  var PREFS = "spop.panel.prefs";
  var $ = function (id) {
    return document.getElementById(id);
  };
  var FIELDS = [
    // [pop field, label] in the guide's order (SPEC §2)
    ["source", "Caller"],
    ["destination", "Number dialled"],
    ["queue_name", "Queue"],
    ["contact_description", "Description"],
    ["wait_time", "Wait time"],
    ["from", "Transferred by"],
    ["redirect", "Forwarded from"],
  ];
  var CHANGES = {
    answered: "Talking",
    consulted: "Consulting",
    transferred: "Transferred",
    conferenced: "Conference",
    requeued: "Back in queue",
    withdrawn: "Withdrawn",
    ended: "Ended",
    "popped again": "Popped again",
  };
  // the states in which a card still follows its contact (the others are final)
  var FOLLOWING = { ringing: true, answered: true, conferenced: true };

  var handle = null;
  var buttons = [];
  var cards = []; // {pop, state, since, note, talk}, newest first
  var resources = [];

  function duration(seconds) {
    seconds = Math.max(0, Math.floor(Number(seconds) || 0));
    var m = Math.floor(seconds / 60);
    var s = seconds % 60;
    return m + ":" + (s < 10 ? "0" : "") + s;
  }

  /* `{field}` and `{contact_data[key]}` filled in, each value URL-encoded; `{{` `}}` literal. */
  function expand(template, pop) {
    return template.replace(/\{\{|\}\}|\{([^{}]+)\}/g, function (match, name) {
      if (match === "{{") return "{";
      if (match === "}}") return "}";
      var data = /^contact_data\[(.+)\]$/.exec(name);
      var value = data ? (pop.contact_data || {})[data[1]] : pop[name];
      return encodeURIComponent(value === undefined || value === null ? "" : String(value));
    });
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function save() {
    try {
      sessionStorage.setItem(STORE, JSON.stringify(cards));
    } catch (e) {
      /* the list is only a convenience */
    }
  }

  function stateText(card) {
    var label = card.state === "ringing" ? "Ringing" : CHANGES[card.state] || card.state;
    if (card.state === "answered") {
      var talking = "Talking " + duration((Date.now() - card.since) / 1000);
      return card.note ? talking + " · " + card.note : talking;
    }
    if (card.state === "ended" && card.talk !== undefined) label += " · talked " + duration(card.talk);
    return card.note ? label + " · " + card.note : label;
  }

  function render() {
    var list = $("cards");
    list.textContent = "";
    $("empty").hidden = cards.length > 0;
    cards.forEach(function (card, index) {
      var pop = card.pop;
      var who = pop.source || pop.destination || pop.resource;
      var item = el("li", {
        class: "card " + (card.state === "answered" ? "talking" : card.state === "ended" || card.state === "popped again" ? "ended" : "ringing"),
        "aria-labelledby": "card-title-" + index,
        "data-pop-id": pop.id,
        "data-contact-id": pop.contact_id || "",
      });
      var head = el("div", { class: "card-head" });
      head.appendChild(el("h3", { id: "card-title-" + index }, (pop.media === "telephone" ? "Call from " : "Contact from ") + who));
      head.appendChild(el("span", { class: "state", "data-state": card.state }, stateText(card)));
      head.appendChild(el("time", { class: "when", datetime: pop.created_at || "" }, new Date(card.received).toLocaleTimeString()));
      item.appendChild(head);
      var fields = el("dl", { class: "fields" });
      FIELDS.forEach(function (pair) {
        var value = pop[pair[0]];
        if (value === undefined || value === null || value === "") return;
        if (pair[0] === "wait_time") value = duration(value);
        fields.appendChild(el("dt", {}, pair[1]));
        fields.appendChild(el("dd", { "data-field": pair[0] }, String(value)));
      });
      if (resources.length > 1) {
        fields.appendChild(el("dt", {}, "For"));
        fields.appendChild(el("dd", { "data-field": "resource" }, pop.resource));
      }
      item.appendChild(fields);
      var data = pop.contact_data || {};
      var keys = Object.keys(data);
      if (keys.length) {
        var table = el("table", { class: "data" });
        table.appendChild(el("caption", {}, "Contact data"));
        keys.forEach(function (key) {
          var row = el("tr");
          row.appendChild(el("th", { scope: "row" }, key));
          row.appendChild(el("td", {}, String(data[key])));
          table.appendChild(row);
        });
        item.appendChild(table);
      }
      if (buttons.length) {
        var actions = el("div", { class: "actions", role: "group", "aria-label": "Actions for " + who });
        buttons.forEach(function (button) {
          var link = el("a", { class: "button", href: expand(button.url, pop), target: "_blank", rel: "noopener noreferrer" }, button.label);
          link.setAttribute("aria-label", button.label + " for " + who);
          actions.appendChild(link);
        });
        item.appendChild(actions);
      }
      list.appendChild(item);
    });
  }

  function announce(text) {
    $("announce").textContent = text;
  }

  function notify(pop) {
    if (!document.hidden || typeof Notification === "undefined" || Notification.permission !== "granted") return;
    var body = [pop.queue_name, pop.contact_description].filter(Boolean).join(" · ");
    var note = new Notification("Call from " + (pop.source || pop.destination || pop.resource), { body: body, tag: pop.id });
    note.onclick = function () {
      window.focus();
      note.close();
    };
  }

  /* A newer pop of the same contact for the same resource (a recall, a queue ringing the agent
     again): the hub's changes name the newer pop from now on (protocol.md, `pop_id`), so the
     earlier card stops following, instead of staying `Ringing` after the hang-up. */
  function supersede(pop) {
    if (!pop.contact_id) return;
    var at = "at " + new Date().toLocaleTimeString();
    cards.forEach(function (card) {
      var old = card.pop;
      if (old.id === pop.id || old.contact_id !== pop.contact_id) return;
      if (old.resource !== pop.resource || old.media !== pop.media || !FOLLOWING[card.state]) return;
      card.state = "popped again";
      card.note = at;
    });
  }

  function onPop(pop) {
    supersede(pop);
    cards.unshift({ pop: pop, state: "ringing", since: Date.now(), received: Date.now() });
    cards.length = Math.min(cards.length, MAX_CARDS);
    save();
    render();
    announce("New contact from " + (pop.source || pop.resource) + (pop.queue_name ? ", queue " + pop.queue_name : ""));
    notify(pop);
  }

  function onContactChanged(change) {
    var card = null;
    for (var i = 0; i < cards.length; i++) {
      var pop = cards[i].pop;
      if ((change.pop_id && pop.id === change.pop_id) || (change.contact_id && pop.contact_id === change.contact_id)) {
        card = cards[i];
        break;
      }
    }
    if (!card) return;
    var mine = resources.indexOf(change.answered_by) >= 0 || !change.answered_by;
    card.state = change.change;
    card.note = "";
    if (change.change === "answered") {
      card.since = change.at ? Date.parse(change.at) || Date.now() : Date.now();
      if (!mine) {
        card.state = "ended";
        card.note = "answered by " + change.answered_by;
      }
    } else if (change.change === "transferred" && change.transferred_to) {
      card.note = "to " + change.transferred_to;
    } else if (change.change === "consulted" && change.consulted) {
      card.state = "answered";
      card.note = "consulting " + change.consulted;
    } else if (change.change === "ended") {
      // an abandoned call was never talked: no "talked 0:00"
      if (change.talk_time !== undefined && change.talk_time !== "" && change.reason !== "abandoned") card.talk = change.talk_time;
      if (change.reason) card.note = change.reason;
    } else if ((change.change === "withdrawn" || change.change === "requeued") && change.reason) {
      card.note = change.reason;
    }
    save();
    render();
    announce(stateText(card));
  }

  function setStatus(status) {
    var line = $("status");
    line.textContent = status;
    line.className = "status " + status.toLowerCase().replace(/\s+/g, "-");
    if (status === "Signed out") showSignIn();
  }

  function showSignIn() {
    if (handle) handle.close();
    handle = null;
    $("sign-in").hidden = false;
    $("calls").hidden = true;
    $("sign-out").hidden = true;
    $("who").textContent = "";
    $("status").textContent = "Signed out";
    $("status").className = "status";
  }

  function start(prefs, session) {
    buttons = session.buttons || [];
    resources = prefs.resource
      .split(",")
      .map(function (r) {
        return r.trim();
      })
      .filter(Boolean);
    $("sign-in").hidden = true;
    $("calls").hidden = false;
    $("sign-out").hidden = false;
    $("who").textContent = prefs.media + " " + resources.join(", ");
    render();
    handle = spop.listen({
      media: prefs.media,
      resource: resources,
      onPop: onPop,
      onContactChanged: onContactChanged,
      onStatus: setStatus,
    });
  }

  function readPrefs() {
    try {
      return JSON.parse(localStorage.getItem(PREFS) || "null");
    } catch (e) {
      return null;
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    try {
      cards = JSON.parse(sessionStorage.getItem(STORE) || "[]") || [];
    } catch (e) {
      cards = [];
    }
    var prefs = readPrefs();
    if (prefs) {
      $("media").value = prefs.media;
      $("resource").value = prefs.resource;
    }
    $("sign-in").addEventListener("submit", function (event) {
      event.preventDefault();
      var chosen = { media: $("media").value, resource: $("resource").value };
      $("sign-in-error").textContent = "";
      if (typeof Notification !== "undefined" && Notification.permission === "default") {
        Notification.requestPermission(); // asked on a click, as browsers require
      }
      spop.signIn({ token: $("token").value }).then(
        function (session) {
          $("token").value = "";
          localStorage.setItem(PREFS, JSON.stringify(chosen)); // never the token
          start(chosen, session);
        },
        function (error) {
          $("sign-in-error").textContent = "Sign-in refused: " + error.message;
          $("token").focus();
        }
      );
    });
    $("sign-out").addEventListener("click", function () {
      spop.signOut({}).finally(showSignIn);
    });
    setInterval(function () {
      // the talking clocks
      var talking = document.querySelectorAll('.state[data-state="answered"]');
      if (!talking.length) return;
      talking.forEach(function (node) {
        var item = node.closest(".card");
        for (var i = 0; i < cards.length; i++) {
          if (cards[i].pop.id === item.getAttribute("data-pop-id")) node.textContent = stateText(cards[i]);
        }
      });
    }, 1000);
    if (prefs) {
      spop.session({}).then(
        function (session) {
          start(prefs, session); // still signed in (the cookie): straight back to work
        },
        function () {
          showSignIn();
          $("token").focus();
        }
      );
    } else {
      showSignIn();
      $("resource").focus();
    }
  });
})();
