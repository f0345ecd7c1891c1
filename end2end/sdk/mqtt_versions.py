"""An independent MQTT client (Eclipse Paho, from PyPI) logging in to Updraft as an IoTDA device in MQTT
3.1, 3.1.1 or 5.0: it publishes on a custom topic (QoS 1, must be acknowledged), waits for the
platform's `version_query` and answers with `version_report`. Run by server/tests/it/device_compat.rs;
prints one JSON line of what happened.

Environment: MQTT_HOST, MQTT_PORT, MQTT_VERSION (31, 311 or 5), DEVICE_ID, CLIENT_ID, PASSWORD,
SW_VERSION (what to report).
"""

import json
import os
import threading

import paho.mqtt.client as mqtt

env = os.environ
version = {"31": mqtt.MQTTv31, "311": mqtt.MQTTv311, "5": mqtt.MQTTv5}[env["MQTT_VERSION"]]
device = env["DEVICE_ID"]
out = {"connack": None, "custom_acked": False, "version_query": None}
connected, acked, queried = threading.Event(), threading.Event(), threading.Event()


def on_connect(client, userdata, flags, reason_code, properties=None):
    out["connack"] = int(reason_code.value) if hasattr(reason_code, "value") else int(reason_code)
    connected.set()


def on_publish(client, userdata, mid, reason_code=None, properties=None):
    out["custom_acked"] = True
    acked.set()


def on_message(client, userdata, msg):
    event = json.loads(msg.payload)
    service = event["services"][0]
    if service["event_type"] == "version_query":
        out["version_query"] = {"topic": msg.topic, "paras": service.get("paras", {})}
        queried.set()


client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2, client_id=env["CLIENT_ID"], protocol=version
)
client.username_pw_set(device, env["PASSWORD"])
client.on_connect, client.on_publish, client.on_message = on_connect, on_publish, on_message
client.connect(env["MQTT_HOST"], int(env["MQTT_PORT"]), keepalive=30)
client.loop_start()
if connected.wait(10) and out["connack"] == 0:
    client.publish(f"custom/{device}/telemetry", b'{"t": 21.5}', qos=1)
    acked.wait(10)
    if queried.wait(30):
        report = {"object_device_id": device, "services": [{
            "service_id": "$ota", "event_type": "version_report",
            "paras": {"sw_version": env["SW_VERSION"], "fw_version": env["SW_VERSION"]}}]}
        info = client.publish(f"$oc/devices/{device}/sys/events/up", json.dumps(report), qos=1)
        info.wait_for_publish(10)
client.disconnect()
client.loop_stop()
print(json.dumps(out))
