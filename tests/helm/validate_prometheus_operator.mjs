// Checks Prometheus Operator resources against the validators of the npm package
// @kubernetes-models/prometheus-operator (generated from the operator's monitoring.coreos.com/v1
// API types). Usage: node validate_prometheus_operator.mjs MODELS_DIR < manifests.json
// (a JSON list); prints one line per invalid manifest and exits 1 if there was any.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const models = join(process.argv[2], "node_modules/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1");
const manifests = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const manifest of manifests) {
  const module = await import(pathToFileURL(join(models, `${manifest.kind}.js`)).href);
  try {
    new module[manifest.kind](manifest).validate();
  } catch (error) {
    failed += 1;
    console.log(`${manifest.kind}/${manifest.metadata.name}: ${error.message}`);
  }
}
process.exit(failed ? 1 : 0);
