// snapvm ui: the page's script (served by vmm/src/ui/server.rs). Plain
// JavaScript, no build step. It polls the server's JSON API about once a
// second and never reloads the page; every text from the server is put in
// with textContent, never parsed as HTML.
'use strict';

// The session token. `snapvm ui` prints http://HOST:PORT/#token=T: a URL's
// fragment never reaches a server. It is kept in sessionStorage (this tab,
// this origin: host and port), taken out of the address bar, and sent in
// the X-Snapvm-Token header of every API request (the rules are in
// vmm/src/ui/auth.rs). Nothing the server sends holds it.
const TOKEN_KEY = 'snapvm-ui-token';

function takeToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  const given = params.get('token');
  if (given) {
    try {
      sessionStorage.setItem(TOKEN_KEY, given);
    } catch (_) {
      // No storage: the token serves this load only.
    }
    params.delete('token');
    const rest = params.toString();
    history.replaceState(null, '', location.pathname + location.search + (rest ? '#' + rest : ''));
    return given;
  }
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch (_) {
    return null;
  }
}

const TOKEN = takeToken();
const SVG_NS = 'http://www.w3.org/2000/svg';
const POLL_MS = 1000;

const $ = (id) => document.getElementById(id);

const ui = {
  vms: [],
  selected: null, // the selected VM's key
  detail: null, // GET /api/vms/{key}
  snap: null, // the selected snapshot's id
  pending: null, // the action whose request is under way
  watched: new Map(), // job id -> {vm, label}
  listSig: '',
  locked: false, // no token, or a wrong one: nothing is asked any more
  treeSig: '',
  mergesSig: '',
};

// ---- talking to the server -------------------------------------------

async function api(method, path, body) {
  const opts = { method, headers: { 'X-Snapvm-Token': TOKEN || '' }, credentials: 'omit' };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (e) {
    throw new Error('the snapvm ui server does not answer (' + e.message + ')');
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (resp.status === 401) needToken(data && data.error);
  if (!resp.ok) {
    throw new Error(data && typeof data.error === 'string' ? data.error : 'HTTP ' + resp.status + ' ' + text);
  }
  return data;
}

// Without the token (or with a wrong one) the page says how to get it and
// stops asking.
function needToken(why) {
  ui.locked = true;
  clearTimeout(timer);
  $('need-token-why').textContent = why || '';
  $('need-token').hidden = false;
  $('main').hidden = true;
}

const vmPath = (key) => '/api/vms/' + encodeURIComponent(key);
const snapPath = (key, id) => vmPath(key) + '/snapshots/' + encodeURIComponent(id);

// ---- formatting ----------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return (i === 0 ? String(v) : v.toFixed(v < 10 ? 1 : 0)) + ' ' + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return '-';
  const t = Math.floor(s);
  const h = Math.floor(t / 3600);
  const m = Math.floor((t % 3600) / 60);
  const sec = t % 60;
  if (h > 0) return h + ' h ' + String(m).padStart(2, '0') + ' min';
  if (m > 0) return m + ' min ' + String(sec).padStart(2, '0') + ' s';
  return sec + ' s';
}

const when = (ms) => new Date(ms).toLocaleString();
const STATE_WORDS = { 'not-answering': 'not answering' };
const stateText = (state) => STATE_WORDS[state] || state;
const count = (n, one, many) => n + ' ' + (n === 1 ? one : many);
const pauseText = (us) => (us === null || us === undefined ? null : 'pause ' + (us / 1000).toFixed(2) + ' ms');
const quoted = (s) => '"' + s.name + '"';

function clip(text, max) {
  return text.length > max ? text.slice(0, max - 1) + '…' : text;
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) e.setAttribute(k, String(v));
  }
  if (text !== undefined) e.textContent = text;
  return e;
}

function facts(dl, rows) {
  dl.replaceChildren();
  for (const [k, v] of rows) {
    if (v === null || v === undefined || v === '') continue;
    dl.append(el('dt', {}, k), el('dd', {}, String(v)));
  }
}

// ---- messages --------------------------------------------------------------

function showError(msg) {
  $('error').textContent = msg || '';
  $('error-bar').hidden = !msg;
}

function showNotice(msg) {
  $('notice').textContent = msg || '';
  $('notice').hidden = !msg;
}

function conn(msg) {
  $('conn').textContent = msg || '';
  $('conn').hidden = !msg;
}

// ---- the dialog ------------------------------------------------------------

// Asks; resolves to the input's text (or '' without input) on OK, null on
// Cancel or Escape.
function ask({ title, text, lines, input, ok }) {
  const d = $('dialog');
  $('dialog-title').textContent = title || '';
  $('dialog-text').textContent = text || '';
  $('dialog-list').replaceChildren(...(lines || []).map((l) => el('li', {}, l)));
  const field = $('dialog-input');
  field.hidden = input === undefined || input === null;
  field.value = field.hidden ? '' : input;
  $('confirm-ok').textContent = ok || 'OK';
  return new Promise((resolve) => {
    const done = (value) => {
      $('confirm-ok').onclick = null;
      $('confirm-cancel').onclick = null;
      d.oncancel = null;
      field.onkeydown = null;
      if (d.open) d.close();
      resolve(value);
    };
    $('confirm-ok').onclick = () => done(field.hidden ? '' : field.value);
    $('confirm-cancel').onclick = () => done(null);
    d.oncancel = (e) => {
      e.preventDefault();
      done(null);
    };
    field.onkeydown = (e) => {
      if (e.key === 'Enter') done(field.value);
    };
    d.showModal();
    if (!field.hidden) {
      field.focus();
      field.select();
    }
  });
}

// ---- actions -----------------------------------------------------------------

// Runs one request for the selected VM; follows the job it answers with.
async function act(label, method, path, body) {
  const key = ui.selected;
  if (!key || ui.pending) return;
  showError('');
  showNotice('');
  ui.pending = label;
  renderDetail();
  try {
    const r = await api(method, path, body);
    if (r && r.job) ui.watched.set(r.job, { vm: key, label });
    if (r && r.message) showNotice(r.message);
    return r;
  } catch (e) {
    showError(e.message);
    return null;
  } finally {
    ui.pending = null;
    refresh();
  }
}

function selectedSnapshot() {
  if (!ui.detail || !ui.snap) return null;
  return ui.detail.snapshots.find((s) => s.id === ui.snap) || null;
}

function power(what, label) {
  act(label, 'POST', vmPath(ui.selected) + '/' + what);
}

async function takeSnapshot() {
  const name = $('snap-name').value.trim();
  const description = $('snap-desc').value;
  const r = await act('taking a snapshot', 'POST', vmPath(ui.selected) + '/snapshots', {
    name: name || null,
    description,
  });
  if (r) {
    $('snap-name').value = '';
    $('snap-desc').value = '';
  }
}

async function applySnapshot() {
  const s = selectedSnapshot();
  if (!s) return;
  const saveFirst = $('save-first').checked;
  const ok = await ask({
    title: 'Apply snapshot ' + quoted(s) + '?',
    text: saveFirst
      ? 'A snapshot of the current state is taken first; then the VM continues from ' + quoted(s) + ' (' + s.power_state + ').'
      : 'The VM continues from ' + quoted(s) + ' (' + s.power_state + '). Its current state is lost unless you check "save the current state first".',
    ok: 'Apply',
  });
  if (ok === null) return;
  act('applying ' + quoted(s), 'POST', snapPath(ui.selected, s.id) + '/apply', { save_first: saveFirst });
}

async function renameSnapshot() {
  const s = selectedSnapshot();
  if (!s) return;
  const name = await ask({ title: 'Rename snapshot ' + quoted(s), text: 'New name:', input: s.name, ok: 'Rename' });
  if (name === null) return;
  act('renaming', 'PATCH', snapPath(ui.selected, s.id), { name });
}

async function describeSnapshot() {
  const s = selectedSnapshot();
  if (!s) return;
  const description = await ask({
    title: 'Describe snapshot ' + quoted(s),
    text: 'Description:',
    input: s.description || '',
    ok: 'Save',
  });
  if (description === null) return;
  act('describing', 'PATCH', snapPath(ui.selected, s.id), { description });
}

async function exportSnapshot() {
  const s = selectedSnapshot();
  if (!s) return;
  const suggestion = (ui.selected + '-' + s.name).replace(/[^A-Za-z0-9._-]+/g, '-');
  const path = await ask({
    title: 'Export snapshot ' + quoted(s),
    text: 'A standalone VM directory (configuration, kernel, flattened disks, state and memory). ' +
      'A relative path is under ' + ($('root-dir').textContent || 'the directory shown') + '.',
    input: suggestion,
    ok: 'Export',
  });
  if (path === null) return;
  act('exporting', 'POST', snapPath(ui.selected, s.id) + '/export', { path });
}

// What a delete removes and which disk layers merge, in words.
function deletePlan(s, subtree) {
  const snaps = ui.detail.snapshots;
  const byId = new Map(snaps.map((x) => [x.id, x]));
  const now = ui.detail.now;
  const parent = s.parent ? byId.get(s.parent) : null;
  const up = parent ? quoted(parent) : 'the top of the tree';
  const lines = [];
  if (!subtree) {
    const kids = snaps.filter((c) => c.parent === s.id);
    const standing = kids.map(quoted);
    if (now === s.id) standing.push('Now (the VM\'s current disk)');
    let text = 'Its saved state and memory are deleted.';
    if (standing.length > 0) text += ' What hangs under it (' + standing.join(', ') + ') moves up to ' + up + '.';
    if (!s.disks || s.disks.length === 0) {
      lines.push('It has no disk layers: nothing merges.');
    } else if (standing.length === 0) {
      lines.push('The disk layer of ' + quoted(s) + ' is removed: nothing stands on it.');
    } else if (standing.length === 1) {
      lines.push('The disk layer of ' + quoted(s) + ' merges into ' + standing[0] + '.');
    } else {
      lines.push('The disk layer of ' + quoted(s) + ' waits for a merge: ' + standing.length +
        ' layers stand on it; it merges when only one is left.');
    }
    lines.push('Merges run in the background; the VM and the other snapshots read exactly what they read before.');
    return { title: 'Delete snapshot ' + quoted(s) + '?', text, lines };
  }
  const gone = [s.id];
  for (let i = 0; i < gone.length; i += 1) {
    for (const c of snaps) if (c.parent === gone[i]) gone.push(c.id);
  }
  const names = gone.map((id) => quoted(byId.get(id)));
  lines.push('Deleted: ' + names.join(', ') + '.');
  if (gone.includes(now)) {
    lines.push('Now moves up to ' + up + '; the disk layers from ' + quoted(s) +
      ' down to where Now hangs merge into the VM\'s current disk, the others are removed.');
  } else {
    lines.push('Their disk layers are removed: nothing else stands on them.');
  }
  lines.push('Merges run in the background; the VM and the other snapshots read exactly what they read before.');
  return {
    title: gone.length === 1
      ? 'Delete ' + quoted(s) + ' (nothing hangs below it)?'
      : 'Delete ' + quoted(s) + ' and the ' + (gone.length - 1) + ' snapshot(s) below it?',
    text: 'Their saved states and memory are deleted.',
    lines,
  };
}

async function deleteSnapshot(subtree) {
  const s = selectedSnapshot();
  if (!s) return;
  const plan = deletePlan(s, subtree);
  const ok = await ask({ ...plan, ok: subtree ? 'Delete subtree' : 'Delete' });
  if (ok === null) return;
  const q = subtree ? '?subtree=true' : '';
  const r = await act('deleting ' + quoted(s), 'DELETE', snapPath(ui.selected, s.id) + q);
  if (r) {
    ui.snap = null;
    if (!r.job) showNotice('deleted ' + (r.deleted || []).map(quoted).join(', ') + '; no disk layers to merge');
  }
}

// ---- polling ---------------------------------------------------------------

let timer = null;
let polling = false;
let again = false;

function refresh() {
  if (ui.locked) return;
  if (polling) {
    again = true;
    return;
  }
  clearTimeout(timer);
  polling = true;
  poll().finally(() => {
    polling = false;
    if (again) {
      again = false;
      refresh();
    } else if (!ui.locked) {
      timer = setTimeout(refresh, POLL_MS);
    }
  });
}

async function poll() {
  try {
    const list = await api('GET', '/api/vms');
    conn('');
    $('root-dir').textContent = list.dir;
    ui.vms = list.vms;
    if (ui.selected && !ui.vms.some((v) => v.key === ui.selected)) select(null);
    if (!ui.selected) {
      const key = new URLSearchParams(location.hash.slice(1)).get('vm');
      if (key && ui.vms.some((v) => v.key === key)) ui.selected = key;
    }
    renderList();
    if (ui.selected) {
      const key = ui.selected;
      const d = await api('GET', vmPath(key));
      if (ui.selected === key) {
        ui.detail = d;
        followJobs();
      }
    }
    renderDetail();
  } catch (e) {
    if (!ui.locked) conn(e.message);
  }
}

// Reports the end of the jobs this page started.
function followJobs() {
  const d = ui.detail;
  for (const [id, w] of ui.watched) {
    if (w.vm !== d.vm.key) continue;
    const j = d.jobs.find((x) => x.id === id);
    if (!j) {
      // Gone with its VMM (an apply of a snapshot taken powered off ends it).
      if (d.vm.state === 'stopped') ui.watched.delete(id);
      continue;
    }
    if (j.state === 'running') continue;
    ui.watched.delete(id);
    if (j.state === 'failed') showError(j.error || (w.label + ' failed'));
    else showNotice(jobSummary(j));
  }
}

function jobSummary(j) {
  const r = j.result || {};
  switch (j.kind) {
    case 'snapshot-create':
      if (r.snapshot) {
        const p = pauseText(r.snapshot.pause_us);
        return 'snapshot ' + quoted(r.snapshot) + ' taken' + (p ? ': ' + p : '') +
          ', ' + bytes(r.snapshot.memory_bytes) + ' of memory written';
      }
      return 'snapshot taken';
    case 'snapshot-apply':
      if (r.applied) {
        return 'applied ' + quoted(r.applied) + (r.apply_ms !== undefined ? ' in ' + r.apply_ms + ' ms' : '') +
          (r.saved_current ? ' (the state before is snapshot ' + quoted(r.saved_current) + ')' : '') +
          '; the VM is ' + (r.power_state === 'off' ? 'stopped' : r.power_state);
      }
      return 'applied';
    case 'merge':
      return mergeSummary(j);
    default:
      return typeof r === 'string' ? r : j.kind + ' done';
  }
}

function mergeSummary(j) {
  const rep = (j.result && (j.result.report || j.result)) || {};
  if (rep.merged === undefined) return 'merge done';
  return 'merge done: ' + rep.merged + ' layer(s) merged, ' + rep.removed + ' removed, ' +
    bytes(rep.copied_bytes) + ' copied' + (j.result.interrupted ? ' (interrupted; it continues after the other job)' : '');
}

// ---- rendering -----------------------------------------------------------

function select(key) {
  if (ui.selected !== key) {
    ui.selected = key;
    ui.detail = null;
    ui.snap = null;
    ui.treeSig = '';
    ui.mergesSig = '';
    const here = location.pathname + location.search;
    history.replaceState(null, '', key ? here + '#' + new URLSearchParams({ vm: key }) : here);
  }
  renderList();
  renderDetail();
  refresh();
}

// What the list shows of a VM besides its name and state, as
// [class, text] pairs.
function vmFacts(v) {
  const st = v.status;
  if (!st) return v.error ? [['vm-problem', clip(v.error, 90)]] : [];
  const facts = [];
  if (st.uptime_s !== null && st.uptime_s !== undefined) facts.push(['vm-uptime', 'up ' + duration(st.uptime_s)]);
  facts.push(
    ['vm-memory', bytes(st.memory_bytes)],
    ['vm-vcpus', count(st.vcpus, 'vCPU', 'vCPUs')],
    ['vm-disks', count(st.disks.length, 'disk', 'disks')],
    ['vm-nets', count(st.nets.length, 'adapter', 'adapters')],
  );
  return facts;
}

function renderList() {
  const sig = JSON.stringify([ui.selected, ui.vms.map((v) => [v.key, v.name, v.state, v.dir])]);
  $('no-vms').hidden = ui.vms.length > 0;
  if (sig !== ui.listSig) {
    ui.listSig = sig;
    $('vms').replaceChildren(...ui.vms.map((v) => {
      const li = el('li', {
        class: 'vm' + (v.key === ui.selected ? ' selected' : ''),
        'data-name': v.name,
        'data-key': v.key,
        'data-state': v.state,
        title: v.dir,
      });
      li.append(
        el('span', { class: 'vm-name' }, v.name),
        el('span', { class: 'badge ' + v.state }, stateText(v.state)),
        el('div', { class: 'vm-facts' }),
      );
      li.addEventListener('click', () => select(v.key));
      return li;
    }));
  }
  // The facts change every second (the uptime): they are updated in place,
  // so that the items stay (and a click on one lands).
  const items = $('vms').children;
  ui.vms.forEach((v, i) => {
    const box = items[i] ? items[i].querySelector('.vm-facts') : null;
    if (!box) return;
    const facts = vmFacts(v);
    const factsSig = JSON.stringify(facts);
    if (box.dataset.sig === factsSig) return;
    box.dataset.sig = factsSig;
    box.replaceChildren(...facts.map(([cls, text]) => el('span', { class: cls }, text)));
  });
}

function renderDetail() {
  const d = ui.detail && ui.detail.vm.key === ui.selected ? ui.detail : null;
  $('pick').hidden = !!ui.selected;
  $('vm').hidden = !ui.selected;
  if (!d) return;
  const vm = d.vm;
  const st = vm.status;
  $('vm-name').textContent = vm.name;
  $('vm-state').textContent = stateText(vm.state);
  $('vm-state').className = 'badge ' + vm.state;
  $('vm-busy').textContent = ui.pending ? ui.pending + '…' : vm.busy || '';
  // Shown in two columns, row by row.
  const rows = [];
  if (st) {
    rows.push(
      ['Memory', bytes(st.memory_bytes)],
      ['vCPUs', st.vcpus],
      ['Uptime', st.uptime_s !== null && st.uptime_s !== undefined ? duration(st.uptime_s) : '-'],
      ['PID', st.pid !== null && st.pid !== undefined ? st.pid : '-'],
      ['Disks', st.disks.length === 0 ? 'none' : st.disks.map((k) => k.name + ': ' + k.current +
        (k.readonly ? ' (read-only)' : '') + (k.independent ? ' (independent)' : '') +
        ', ' + k.layers.length + ' layer(s)').join('; ')],
      ['Network adapters', st.nets.length === 0 ? 'none' : st.nets.map((n) => n.name + ': tap ' + n.tap + ', MAC ' + n.mac).join('; ')],
    );
    if (st.memory_load) {
      rows.push(['Memory loading', (st.memory_load.chunks_loaded * 2) + ' of ' + (st.memory_load.chunks * 2) + ' MiB']);
    }
    if (st.last_exit && vm.state === 'stopped') rows.push(['Last exit', st.last_exit.outcome]);
  }
  rows.push(['Directory', vm.dir]);
  if (vm.error) rows.push(['Problem', vm.error]);
  facts($('hw'), rows);
  const idle = !ui.pending && !vm.busy;
  $('btn-start').disabled = !(idle && vm.state === 'stopped');
  $('btn-stop').disabled = !(idle && (vm.state === 'running' || vm.state === 'paused'));
  $('btn-pause').disabled = !(idle && vm.state === 'running');
  $('btn-resume').disabled = !(idle && vm.state === 'paused');
  $('btn-snapshot').disabled = !(idle && ['running', 'paused', 'stopped'].includes(vm.state));
  renderJobs(d);
  renderMerges(d);
  renderTree(d);
  renderSnapshotDetails(d, idle);
  const pre = $('console');
  if (pre.textContent !== d.console) {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = d.console;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }
}

function progressOf(j) {
  const p = el('progress', { max: j.total > 0 ? String(j.total) : null });
  if (j.total > 0) p.value = j.done;
  return p;
}

function percent(j) {
  if (!(j.total > 0)) return '';
  return Math.floor((j.done * 100) / j.total) + '% (' + bytes(j.done) + ' of ' + bytes(j.total) + ')';
}

const JOB_WORDS = {
  'snapshot-create': 'taking a snapshot',
  'snapshot-apply': 'applying a snapshot',
  export: 'exporting',
};

function renderJobs(d) {
  const running = d.jobs.filter((j) => j.kind !== 'merge' && j.state === 'running');
  $('jobs').replaceChildren(...running.map((j) => {
    const div = el('div', { class: 'job', 'data-id': j.id, 'data-kind': j.kind, 'data-state': j.state });
    div.append(el('span', {}, JOB_WORDS[j.kind] || j.kind), progressOf(j), el('span', {}, percent(j)));
    return div;
  }));
}

function renderMerges(d) {
  const items = [];
  const ms = d.vm.status ? d.vm.status.merges : { waiting: [], in_progress: null };
  for (const j of d.jobs.filter((x) => x.kind === 'merge')) {
    const li = el('li', { class: 'merge', 'data-id': j.id, 'data-state': j.state });
    if (j.state === 'running') {
      li.append(el('span', {}, 'merging disk layers'), progressOf(j), el('span', {}, percent(j)));
    } else if (j.state === 'failed') {
      li.append(el('span', {}, 'merge failed: ' + (j.error || '')));
    } else {
      const ago = j.ended_ms ? Math.max(0, Math.round((d.now_ms - j.ended_ms) / 1000)) + ' s ago' : '';
      li.append(el('span', {}, mergeSummary(j) + (ago ? ' (' + ago + ')' : '')));
    }
    items.push(li);
  }
  if (ms.in_progress) {
    const m = ms.in_progress;
    items.push(el('li', { class: 'merge', 'data-state': 'in-progress' },
      'merging disk layer ' + m.parent + ' with ' + m.child + ' (' + m.direction + ')'));
  }
  for (const w of ms.waiting || []) {
    items.push(el('li', { class: 'merge', 'data-state': 'waiting' }, 'disk layer ' + w + ' waits for a merge'));
  }
  $('merges').replaceChildren(...items);
  $('merges-none').hidden = items.length > 0;
}

// The snapshot tree as rows: each snapshot under its parent, indented by
// depth, in creation order; "Now" last under the snapshot it hangs from.
function treeRows(d) {
  const byId = new Map(d.snapshots.map((s) => [s.id, s]));
  const kids = new Map();
  const push = (k, item) => {
    if (!kids.has(k)) kids.set(k, []);
    kids.get(k).push(item);
  };
  for (const s of d.snapshots) push(s.parent && byId.has(s.parent) ? s.parent : '', { snap: s });
  push(d.now && byId.has(d.now) ? d.now : '', { now: true });
  const rows = [];
  const walk = (key, depth, parentRow) => {
    for (const item of kids.get(key) || []) {
      const row = { ...item, depth, parentRow };
      rows.push(row);
      if (item.snap) walk(item.snap.id, depth + 1, rows.length - 1);
    }
  };
  walk('', 0, -1);
  return rows;
}

const BOX_W = 430;
const BOX_H = 42;
const ROW_H = 54;
const INDENT = 30;
const PAD = 12;

function renderTree(d) {
  const sig = JSON.stringify([ui.snap, d.now, d.vm.state, d.snapshots.map((s) =>
    [s.id, s.name, s.parent, s.power_state, s.pause_us, s.size_on_disk && s.size_on_disk.total])]);
  if (sig === ui.treeSig) return;
  ui.treeSig = sig;
  const rows = treeRows(d);
  const tree = $('tree');
  $('tree-empty').hidden = d.snapshots.length > 0 && !d.tree_error;
  $('tree-empty').textContent = d.tree_error || 'No snapshots yet: Now is the VM\'s current state.';
  const width = PAD * 2 + BOX_W + INDENT * Math.max(0, ...rows.map((r) => r.depth));
  const height = PAD * 2 + ROW_H * rows.length - (ROW_H - BOX_H);
  tree.setAttribute('width', width);
  tree.setAttribute('height', height);
  tree.setAttribute('viewBox', '0 0 ' + width + ' ' + height);
  const edges = svg('g', { class: 'edges' });
  const nodes = svg('g', { class: 'nodes' });
  rows.forEach((r, i) => {
    const x = PAD + r.depth * INDENT;
    const y = PAD + i * ROW_H;
    if (r.parentRow >= 0) {
      const p = rows[r.parentRow];
      const px = PAD + p.depth * INDENT + 14;
      const py = PAD + r.parentRow * ROW_H + BOX_H;
      edges.append(svg('path', { class: 'edge', d: 'M' + px + ' ' + py + ' V' + (y + BOX_H / 2) + ' H' + x }));
    }
    nodes.append(r.snap ? snapshotNode(r.snap, x, y) : nowNode(d, x, y));
  });
  tree.replaceChildren(edges, nodes);
}

function snapshotNode(s, x, y) {
  const g = svg('g', {
    class: 'node' + (s.id === ui.snap ? ' selected' : ''),
    'data-id': s.id,
    'data-name': s.name,
    'data-parent': s.parent || '',
    'data-power': s.power_state,
    transform: 'translate(' + x + ',' + y + ')',
  });
  g.append(svg('title', {}, s.name + ' (' + s.id + ')'));
  g.append(svg('rect', { class: 'box', width: BOX_W, height: BOX_H, rx: 6 }));
  g.append(svg('circle', { class: s.power_state, cx: 14, cy: 15, r: 5 }));
  g.append(svg('text', { class: 'title', x: 26, y: 19 }, clip(s.name, 52)));
  const sub = [s.power_state, when(s.created_ms), pauseText(s.pause_us),
    s.size_on_disk ? bytes(s.size_on_disk.total) + ' on disk' : null].filter(Boolean).join(' · ');
  g.append(svg('text', { class: 'sub', x: 26, y: 35 }, sub));
  g.addEventListener('click', () => {
    ui.snap = s.id;
    renderDetail();
  });
  return g;
}

function nowNode(d, x, y) {
  const g = svg('g', {
    class: 'now',
    'data-now': '1',
    'data-parent': d.now || '',
    transform: 'translate(' + x + ',' + y + ')',
  });
  g.append(svg('rect', { class: 'box', width: BOX_W * 0.6, height: BOX_H, rx: 6 }));
  g.append(svg('circle', { class: d.vm.state, cx: 14, cy: 21, r: 5 }));
  g.append(svg('text', { class: 'title', x: 26, y: 25 }, 'Now · ' + stateText(d.vm.state)));
  return g;
}

function renderSnapshotDetails(d, idle) {
  const s = ui.snap ? d.snapshots.find((x) => x.id === ui.snap) : null;
  if (ui.snap && !s) ui.snap = null;
  $('details').hidden = !s;
  for (const id of ['btn-apply', 'btn-rename', 'btn-describe', 'btn-export', 'btn-delete', 'btn-delete-subtree']) {
    $(id).disabled = !(s && idle);
  }
  if (!s) return;
  $('d-name').textContent = s.name;
  $('d-desc').textContent = s.description || '';
  const byId = new Map(d.snapshots.map((x) => [x.id, x]));
  const parent = s.parent ? byId.get(s.parent) : null;
  const kids = d.snapshots.filter((x) => x.parent === s.id);
  const size = s.size_on_disk;
  const hw = s.hardware;
  facts($('d-facts'), [
    ['ID', s.id],
    ['Parent', parent ? parent.name + ' (' + parent.id.slice(0, 8) + ')' : 'none (a root)'],
    ['Children', kids.length ? kids.map((k) => k.name).join(', ') : null],
    ['Now', d.now === s.id ? 'hangs under this snapshot' : null],
    ['Taken', when(s.created_ms)],
    ['Power state', s.power_state],
    ['Pause', s.pause_us === null || s.pause_us === undefined ? null : (s.pause_us / 1000).toFixed(2) + ' ms'],
    ['Memory written', s.power_state === 'off' ? null : bytes(s.memory_bytes)],
    ['Took', s.duration_ms + ' ms'],
    ['Size on disk', size ? bytes(size.total) + ' (files ' + bytes(size.files) + ', disk layers ' + bytes(size.disk_layers) + ')' : null],
    ['Disk layers', (s.disks || []).map((l) => l.name + ': ' + l.layer).join('; ')],
    ['Hardware', hw ? hw.memory + ', ' + hw.vcpus + ' vCPU(s), ' + hw.disks.length + ' disk(s), ' + hw.nets.length + ' adapter(s)' : null],
    ['Differs from now', s.differences && s.differences.length ? s.differences.join('; ') : null],
    ['Not captured', s.not_captured && s.not_captured.length ? s.not_captured.join(', ') + ' (independent)' : null],
    ['Clones', s.clones && s.clones.length ? s.clones.join(', ') : null],
    ['Problem', s.details_error],
  ]);
}

// ---- wiring ------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  $('btn-start').addEventListener('click', () => power('start', 'starting'));
  $('btn-stop').addEventListener('click', () => power('stop', 'stopping'));
  $('btn-pause').addEventListener('click', () => power('pause', 'pausing'));
  $('btn-resume').addEventListener('click', () => power('resume', 'resuming'));
  $('btn-snapshot').addEventListener('click', takeSnapshot);
  $('snap-name').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !$('btn-snapshot').disabled) takeSnapshot();
  });
  $('btn-apply').addEventListener('click', applySnapshot);
  $('btn-rename').addEventListener('click', renameSnapshot);
  $('btn-describe').addEventListener('click', describeSnapshot);
  $('btn-export').addEventListener('click', exportSnapshot);
  $('btn-delete').addEventListener('click', () => deleteSnapshot(false));
  $('btn-delete-subtree').addEventListener('click', () => deleteSnapshot(true));
  $('error-close').addEventListener('click', () => showError(''));
  if (!TOKEN) {
    needToken('');
    return;
  }
  refresh();
});
