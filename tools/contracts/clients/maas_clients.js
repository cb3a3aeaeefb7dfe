// Ready-to-use grpc-js loader for the MaaS client bundle (build/clients), written by
// `make clients` from tools/contracts/clients/maas_clients.js. Needs @grpc/grpc-js and
// @grpc/proto-loader (protobufjs comes with the latter); loads every contract from the .proto
// files next to this folder, so nothing else is needed.
//
//   const maas = require('./node/maas_clients');
//   const {registry, inference, kserve} = maas.load();
//   const client = new registry.RegistryService('localhost:50051', maas.grpc.credentials.createInsecure());
//   client.listModels({}, maas.bearer(token), (error, reply) => {
//     if (error) console.log(maas.statusDetails(error));  // [{'@type': 'google.rpc.ErrorInfo', reason, ...}]
//   });
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const ROOT = path.resolve(__dirname, '..');
// Field names as in the .proto files, 64-bit integers and enums as strings; the TypeScript
// types under node/types were generated with the same options.
const LOADER_OPTIONS = {keepCase: true, longs: String, enums: String, defaults: true, oneofs: true};
const SERVICES = {
  registry: ['maas/registry/v1/registry_service.proto', 'maas.registry.v1'],
  trainer: ['maas/trainer/v1/trainer_service.proto', 'maas.trainer.v1'],
  compressor: ['maas/compressor/v1/compressor_service.proto', 'maas.compressor.v1'],
  inference: ['maas/inference/v1/inference_service.proto', 'maas.inference.v1'],
  usage: ['maas/inference/v1/usage.proto', 'maas.inference.v1'],  // UsageService, same port
  kserve: ['grpc_service.proto', 'inference'],
};
const DETAIL_FILES = ['google/rpc/status.proto', 'google/rpc/error_details.proto'];

/** Every service's package ({registry, trainer, compressor, inference, usage, kserve}). */
function load(options = {}) {
  const files = Object.values(SERVICES).map(([file]) => file);
  const definition = protoLoader.loadSync(files, {...LOADER_OPTIONS, ...options, includeDirs: [ROOT]});
  const loaded = grpc.loadPackageDefinition(definition);
  const packages = {};
  for (const [key, [, packageName]] of Object.entries(SERVICES)) {
    packages[key] = packageName.split('.').reduce((scope, part) => scope[part], loaded);
  }
  return packages;
}

/** Call metadata carrying a bearer token. */
function bearer(token) {
  const metadata = new grpc.Metadata();
  metadata.add('authorization', `Bearer ${token}`);
  return metadata;
}

let detailTypes = null;
function rpcTypes() {
  if (detailTypes === null) {
    const root = new protobuf.Root();
    root.resolvePath = (origin, target) => path.join(ROOT, target);
    detailTypes = root.loadSync(DETAIL_FILES, {keepCase: true});
  }
  return detailTypes;
}

/** The google.rpc.Status details of a grpc-js error (ErrorInfo, BadRequest, ...), decoded;
 * [] when the server sent none. Each detail is a plain object with its '@type'. */
function statusDetails(error) {
  const encoded = error && error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!encoded.length) return [];
  const types = rpcTypes();
  const status = types.lookupType('google.rpc.Status').decode(encoded[0]);
  return status.details.map((any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = types.lookupType(typeName);
    return {'@type': typeName, ...type.toObject(type.decode(any.value), LOADER_OPTIONS)};
  });
}

module.exports = {ROOT, LOADER_OPTIONS, grpc, load, bearer, statusDetails};
