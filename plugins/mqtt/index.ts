// The mqtt connectors (MQTT 3.1.1 and 5, with mqtt.js): sink "mqtt" (outbox → topic, QoS 1) and
// source "mqtt" (topic filters → inbox, a persistent session acknowledged after the inbox commit).

export { mqttSink, type MqttSinkConfig } from "./sink.ts";
export { mqttSource, type MqttSourceConfig } from "./source.ts";
