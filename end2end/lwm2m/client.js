// A third-party LwM2M client for Updraft's tests: Telefonica's lwm2m-node-lib (registration, reads,
// writes, execute, observe) with node-coap's block-wise transfers (RFC 7959 Block2) for the firmware
// download. None of Updraft's code runs here.
//
// Usage: node client.js <host> <port> <endpoint> <firmware now> <firmware after the update>
// Prints one line per step on stdout, each starting with `client: `.
'use strict';

const crypto = require('crypto');
const coap = require('coap');
const lwm2m = require('lwm2m-node-lib').client;

const [host, port, endpoint, current, next] = process.argv.slice(2);
if (!next) {
  console.error('usage: node client.js <host> <port> <endpoint> <firmware now> <firmware after>');
  process.exit(2);
}

// The library logs on stdout too: the test reads only lines marked as ours.
require('logops').setLevel('FATAL');
const say = (line) => console.log(`client: ${line}`);
const fail = (why) => {
  console.error(why);
  process.exit(1);
};

lwm2m.init({
  client: {
    lifetime: '300',
    version: '1.0',
    logLevel: 'FATAL',
    observe: { period: 500 },
    ipProtocol: 'udp4',
    serverProtocol: 'udp4',
  },
});

const registry = lwm2m.registry;
const step = (fn) => new Promise((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v))));

async function objects() {
  await step((cb) => registry.create('/3/0', cb));
  await step((cb) => registry.setResource('/3/0', '3', current, cb));
  await step((cb) => registry.create('/4/0', cb));
  await step((cb) => registry.setResource('/4/0', '2', '-90', cb));
  await step((cb) => registry.setResource('/4/0', '8', '4242', cb));
  await step((cb) => registry.setResource('/4/0', '11', '12', cb));
  await step((cb) => registry.create('/5/0', cb));
  await step((cb) => registry.setResource('/5/0', '1', '', cb));
  await step((cb) => registry.setResource('/5/0', '3', '0', cb));
  await step((cb) => registry.setResource('/5/0', '5', '0', cb));
}

function download(uri) {
  return new Promise((resolve, reject) => {
    const req = coap.request(uri);
    req.on('response', (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        if (!res.code.startsWith('2.')) {
          reject(new Error(`download answered ${res.code}`));
        } else {
          resolve(Buffer.concat(chunks));
        }
      });
    });
    req.on('error', reject);
    req.end();
  });
}

function handlers(device) {
  lwm2m.setHandler(device.serverInfo, 'write', (objectType, objectId, resourceId, value, callback) => {
    callback(null);
    if (String(objectType) !== '5' || String(resourceId) !== '1') {
      return;
    }
    say(`uri ${value}`);
    registry.setResource('/5/0', '3', '1', () => {});
    download(String(value)).then(
      (image) => {
        say(`downloaded ${image.length} ${crypto.createHash('sha256').update(image).digest('hex')}`);
        registry.setResource('/5/0', '3', '2', () => {});
      },
      (err) => {
        say(`download failed ${err.message}`);
        registry.setResource('/5/0', '5', '4', () => registry.setResource('/5/0', '3', '0', () => {}));
      },
    );
  });
  lwm2m.setHandler(device.serverInfo, 'execute', (objectType, objectId, resourceId, args, callback) => {
    callback(null);
    if (String(objectType) !== '5' || String(resourceId) !== '2') {
      return;
    }
    say('update');
    // Install, then "reboot": register again running the new firmware.
    setTimeout(async () => {
      await step((cb) => registry.setResource('/3/0', '3', next, cb));
      await step((cb) => registry.setResource('/5/0', '3', '0', cb));
      await step((cb) => registry.setResource('/5/0', '5', '1', cb));
      lwm2m.unregister(device, () => {
        lwm2m.register(host, port, null, endpoint, (err, again) => {
          if (err) {
            fail(`register after the update: ${err}`);
          }
          say(`rebooted ${next}`);
          handlers(again);
        });
      });
    }, 100);
  });
}

objects()
  .then(() => {
    lwm2m.register(host, port, null, endpoint, (err, device) => {
      if (err) {
        fail(`register: ${err}`);
      }
      say(`registered ${device.location}`);
      handlers(device);
    });
  })
  .catch((e) => fail(String(e)));
