#!/usr/bin/env bash
# Waits for SIGTERM and records that it arrived (signal-forwarding test of the external launcher).
trap 'echo term > "$MARK"; exit 143' TERM
echo ready
for _ in $(seq 600); do sleep 0.1; done
