"""Write etc/fleet/k8s/haproxy.yaml: its haproxy.cfg is llmuxctl.fleet.render's output.

Used by tests/fleet/test_k8s.py, which checks (or with LLMUX_REGEN=1 rewrites) the file.
"""
from __future__ import annotations

import textwrap

from llmuxctl.fleet import Box, Options, render

BOXES = [Box("box1", "llmux-gpu-node-1.llmux.svc.cluster.local:3000",
             {"qwen-14b": ["qwen"], "gemma-12b": []}),
         Box("box2", "llmux-gpu-node-2.llmux.svc.cluster.local:3000",
             {"qwen-14b": ["qwen"], "llama-8b": []})]
OPTIONS = Options(bind=":8080", log="stdout format raw local0",
                  command="llmuxctl fleet haproxy llmux-gpu-node-1.llmux.svc.cluster.local:3000 "
                          "llmux-gpu-node-2.llmux.svc.cluster.local:3000")


def manifest() -> str:
    cfg = textwrap.indent(render(BOXES, OPTIONS), "    ")
    return f"""# The fleet router: HAProxy routing each request by its model to a box where it is
# awake (etc/fleet/haproxy.cfg explains the config; docs/fleet.md the why).
# Regenerate the ConfigMap when boxes or models change:
#   llmuxctl fleet haproxy --bind :8080 BOX:3000... (run where the boxes are reachable)
apiVersion: v1
kind: ConfigMap
metadata:
  name: llmux-haproxy
  namespace: llmux
  labels: {{app.kubernetes.io/name: llmux-haproxy}}
data:
  haproxy.cfg: |
{cfg.rstrip()}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: llmux-haproxy
  namespace: llmux
  labels: {{app.kubernetes.io/name: llmux-haproxy}}
spec:
  # Replicas check the boxes independently; they pick the same fallback box (same
  # server order), so a miss still wakes a model on one box only.
  replicas: 2
  selector:
    matchLabels: {{app.kubernetes.io/name: llmux-haproxy}}
  template:
    metadata:
      labels: {{app.kubernetes.io/name: llmux-haproxy}}
    spec:
      containers:
        - name: haproxy
          image: haproxy:2.6
          args: ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
          ports:
            - {{name: http, containerPort: 8080}}
          resources:
            requests: {{cpu: 500m, memory: 512Mi}}
            limits: {{memory: 2Gi}}
          # TCP probes: HAProxy itself, not the boxes behind it (their health is
          # HAProxy's business, and a box down must not restart the router).
          livenessProbe:
            tcpSocket: {{port: http}}
            periodSeconds: 10
          readinessProbe:
            tcpSocket: {{port: http}}
            periodSeconds: 5
          volumeMounts:
            - {{name: config, mountPath: /usr/local/etc/haproxy, readOnly: true}}
      volumes:
        - name: config
          configMap: {{name: llmux-haproxy}}
---
# What clients use: the OpenAI API of the whole fleet (base_url http://llmux.llmux/v1).
apiVersion: v1
kind: Service
metadata:
  name: llmux
  namespace: llmux
  labels: {{app.kubernetes.io/name: llmux-haproxy}}
spec:
  selector: {{app.kubernetes.io/name: llmux-haproxy}}
  ports:
    - {{name: http, port: 80, targetPort: http}}
"""
