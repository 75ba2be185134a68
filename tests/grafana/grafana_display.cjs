// What Grafana 12 shows for each panel of a dashboard, computed with Grafana's own npm code.
//
// stdin: {"dashboard": {...}, "responses": {"<panel id>": {"<refId>": <Prometheus HTTP API body>}},
//         "steps": {"<panel id>": <step ms>}, "keepName": false}
// stdout: {"<panel id>": {"type", "title", "values": [{"name", "text", "color", "hex"}], "table": {...}}}
//         (colour: the theme's name for it, e.g. "red"; hex: what the dark theme paints)
//
// The chain, as in Grafana 12.4 (a `keepName` run adds `__name__` to every series first, as a
// backend that keeps metric names through functions and aggregations would):
// 1. Prometheus JSON -> data frames. Grafana does this in Go (pkg/promlib/converter/prom.go,
//    readMatrixOrVectorMulti, and pkg/promlib/querydata/response.go, addMetadataToMultiFrame and
//    getName, in dataplane mode, always on since grafana/grafana#92218 removed the
//    prometheusDataplane toggle). Go cannot run here, so
//    `backendFrames` below reproduces those two functions line by line; nothing else is ours.
// 2. The data source's frontend step: transformV2 from @grafana/prometheus 12.4.0
//    (dist/cjs/result_transformer.cjs; format "table" targets become one table frame per refId).
// 3. The panel's transformations through @grafana/data's transformDataFrame and its
//    standardTransformers, then applyFieldOverrides with the field config registry Grafana core
//    registers for these properties (public/app/core/components/OptionsUI/registry.tsx: ids and
//    paths; the processors are @grafana/data's own).
// 4. Display: getFieldDisplayValues (stat, as the stat panel calls it), field.display per cell
//    (table), the legend's reducers (time series); colours named back through the theme.
'use strict';

const path = require('path');
const Module = require('module');

const MODULES = path.resolve(__dirname, '../../grafana/schema-check/node_modules');
const load = Module._load;
// React hook helpers and the runtime's data source service are imported at module load but
// never called on this path (usePrevious in a React hook, getDataSourceSrv for exemplar links).
Module._load = function (request, ...rest) {
  if (request === 'react-use') return { usePrevious: () => undefined };
  if (request === '@grafana/runtime') return { getDataSourceSrv: () => { throw new Error('unused'); } };
  return load.call(this, request, ...rest);
};
// @grafana/data's local-storage helper listens on `window` when it loads.
// Date formats read the browser's language (Node 20 has no `navigator`): en-US, as in a US browser.
globalThis.window = { addEventListener() {}, removeEventListener() {}, location: { search: '', pathname: '/' } };
if (typeof navigator === 'undefined') globalThis.navigator = { language: 'en-US', languages: ['en-US'] };

// Library banners (i18next) go to stderr: stdout carries only the JSON answer.
console.log = console.info = (...args) => process.stderr.write(`${args.join(' ')}\n`);
const req = Module.createRequire(path.join(MODULES, 'x.js'));
const data = req('@grafana/data');
const { lastValueFrom } = req('rxjs');
const { transformV2 } = req(path.join(MODULES, '@grafana/prometheus/dist/cjs/result_transformer.cjs'));

const theme = data.createTheme();
// Grafana core registers these transformers (seriesToColumns is an alias of joinByField: one id).
data.standardTransformersRegistry.setInit(() => {
  const byId = new Map();
  for (const t of Object.values(data.standardTransformers)) if (!byId.has(t.id)) byId.set(t.id, t);
  return [...byId.values()].map((t) => ({ id: t.id, name: t.name, transformation: t }));
});

function option(id, process, extra = {}) {
  return { id, path: id, name: id, process, shouldApply: () => true, override: () => null, editor: () => null, ...extra };
}
const p = data;
const fieldConfigRegistry = new data.FieldConfigOptionsRegistry(() => [
  option('unit', p.unitOverrideProcessor),
  option('min', p.numberOverrideProcessor),
  option('max', p.numberOverrideProcessor),
  option('decimals', p.numberOverrideProcessor),
  option('displayName', p.displayNameOverrideProcessor),
  option('noValue', p.stringOverrideProcessor),
  option('color', p.identityOverrideProcessor),
  option('thresholds', p.thresholdsOverrideProcessor),
  option('mappings', p.valueMappingsOverrideProcessor),
  option('links', p.identityOverrideProcessor),
  ...['cellOptions', 'align', 'inspect', 'drawStyle', 'lineWidth', 'fillOpacity', 'showPoints', 'spanNulls',
    'thresholdsStyle', 'hideFrom', 'lineStyle'].map((name) =>
    option(`custom.${name}`, p.identityOverrideProcessor, { path: name, isCustom: true })
  ),
]);

// ---- 1. Grafana's Go backend (pkg/promlib), reproduced -------------------------------------
const LEGEND = /\{\{\s*(.+?)\s*\}\}/g;

function metricNameFromLabels(labels) {
  const name = labels.__name__;
  const rest = Object.keys(labels).filter((k) => k !== '__name__').sort();
  if (rest.length === 0) return name !== undefined ? name : '{}';
  return `${name !== undefined ? name : ''}{${rest.map((k) => `${k}=${JSON.stringify(labels[k])}`).join(', ')}}`;
}

function getName(target, labels) {
  let legend = metricNameFromLabels(labels);
  if (target.legendFormat === '__auto') {
    if (Object.keys(labels).length > 0) legend = '';
  } else if (target.legendFormat) {
    legend = target.legendFormat.replace(LEGEND, (_, name) => (name in labels ? labels[name] : ''));
  }
  return legend === '{}' ? target.expr : legend;
}

function sample(pair) {
  return [Math.trunc(pair[0] * 1000), Number(pair[1] === '+Inf' ? Infinity : pair[1] === '-Inf' ? -Infinity : pair[1])];
}

function backendFrames(target, body, stepMs, keepName) {
  const result = body.data.result;
  const kind = body.data.resultType;
  const series = kind === 'scalar' ? [{ metric: {}, value: result }] : result;
  const frames = series.map((s) => {
    const labels = keepName && !('__name__' in s.metric) ? { __name__: 'kept_name', ...s.metric } : { ...s.metric };
    const pairs = (s.values || [s.value]).map(sample);
    const custom = getName(target, labels);
    const value = {
      name: labels.__name__ !== undefined ? labels.__name__ : 'Value',
      type: 'number',
      labels,
      config: custom !== '' ? { displayNameFromDS: custom } : {},
      values: pairs.map((x) => x[1]),
    };
    return {
      refId: target.refId,
      name: '',
      meta: {
        type: kind === 'matrix' ? 'timeseries-multi' : 'numeric-multi',
        typeVersion: [0, 1],
        custom: { resultType: kind },
      },
      fields: [{ name: 'Time', type: 'time', config: { interval: stepMs }, values: pairs.map((x) => x[0]) }, value],
      length: pairs.length,
    };
  });
  return frames.length ? frames : [{ refId: target.refId, name: '', meta: {}, fields: [], length: 0 }];
}

// ---- 2-4. Grafana's own code ----------------------------------------------------------------
const hex = (c) => data.colorManipulator.asHexString(c);
const colourNames = new Map();
for (const hue of theme.visualization.hues) {
  for (const shade of hue.shades) colourNames.set(hex(shade.color), shade.name);
}
colourNames.set(hex(theme.visualization.getColorByName('text')), 'text');
for (const name of ['green', 'yellow', 'red', 'blue', 'orange', 'purple']) {
  colourNames.set(hex(theme.visualization.getColorByName(name)), name);
}

function colour(c) {
  if (!c) return null;
  const code = hex(c);
  return colourNames.get(code) || code;
}

function shown(dv) {
  return { text: data.formattedValueToString(dv), color: colour(dv.color), hex: dv.color ? hex(dv.color) : null };
}

// Grafana's dashboard model turns a base step's JSON null back into -Infinity when it loads.
function restoreThresholds(fieldConfig) {
  const copy = JSON.parse(JSON.stringify(fieldConfig));
  const fix = (t) => t && t.steps && t.steps.forEach((s) => { if (s.value === null) s.value = -Infinity; });
  fix(copy.defaults.thresholds);
  for (const o of copy.overrides || []) for (const prop of o.properties) if (prop.id === 'thresholds') fix(prop.value);
  return copy;
}

async function panelData(panel, responses, stepMs, keepName) {
  const targets = panel.targets || [];
  let frames = [];
  for (const t of targets) {
    if (responses[t.refId]) frames.push(...backendFrames(t, responses[t.refId], stepMs, keepName));
  }
  frames = transformV2({ data: frames }, { targets, app: 'dashboard' }, {}).data;
  if (panel.transformations && panel.transformations.length) {
    frames = await lastValueFrom(data.transformDataFrame(panel.transformations, frames));
  }
  const fieldConfig = restoreThresholds(panel.fieldConfig);
  const series = data.applyFieldOverrides({
    data: frames,
    fieldConfig,
    fieldConfigRegistry,
    replaceVariables: (s) => s,
    theme,
    timeZone: 'utc',
  });
  return { series, fieldConfig };
}

function statValues(panel, series, fieldConfig) {
  return data
    .getFieldDisplayValues({
      data: series,
      fieldConfig,
      reduceOptions: panel.options.reduceOptions,
      replaceVariables: (s) => s,
      theme,
      timeZone: 'utc',
    })
    .map((v) => ({ name: v.display.title, ...shown(v.display) }));
}

function tableOf(panel, series) {
  const frame = series[panel.options.frameIndex || 0];
  if (!frame) return { columns: [], rows: [] };
  const fields = frame.fields.filter((f) => !(f.config.custom && f.config.custom.hidden));
  const columns = fields.map((f) => data.getFieldDisplayName(f, frame, series));
  const rows = [];
  // A cell's colour shows only where its cell type draws it (color-text, color-background).
  const coloured = fields.map((f) => /^color-/.test(((f.config.custom || {}).cellOptions || {}).type || ''));
  for (let i = 0; i < frame.length; i++) {
    rows.push(fields.map((f, j) => {
      const cell = shown(f.display(f.values[i]));
      return coloured[j] ? cell : { text: cell.text, color: null, hex: null };
    }));
  }
  return { frames: series.length, columns, rows };
}

function legendValues(panel, series) {
  const out = [];
  for (const frame of series) {
    for (const f of frame.fields) {
      if (f.type !== 'number') continue;
      const calcs = data.reduceField({ field: f, reducers: panel.options.legend.calcs });
      const last = calcs[panel.options.legend.calcs[0]];
      out.push({ name: data.getFieldDisplayName(f, frame, series), ...shown(f.display(last)) });
    }
  }
  return out;
}

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const input = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  const out = {};
  for (const panel of input.dashboard.panels) {
    const responses = input.responses[String(panel.id)];
    if (!responses) continue;
    const step = (input.steps || {})[String(panel.id)] || 1000;
    const { series, fieldConfig } = await panelData(panel, responses, step, Boolean(input.keepName));
    const entry = { type: panel.type, title: panel.title };
    if (panel.type === 'stat') entry.values = statValues(panel, series, fieldConfig);
    else if (panel.type === 'table') entry.table = tableOf(panel, series);
    else if (panel.type === 'timeseries') entry.values = legendValues(panel, series);
    else entry.frames = series.length;
    out[panel.id] = entry;
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
