"""Kubernetes: the API client, the resources the agent reads and writes, list+watch, leader
election, status publishing and MeshNode reporting. Everything here talks to an API server;
the provider (mesh/providers/kubernetes.py), the status report and the agent use it, and it
uses none of them."""
