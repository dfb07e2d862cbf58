"""ingress-nginx's own e2e annotation tests (transcribed in ../shared/ingress-nginx/cases.yaml)
replayed against a real `mesh run` and real echo backends: `python -m tests.ingress_nginx`.

Development tooling, not part of the product. `cases` reads and checks the data, `judge`
sends a request and compares the answer with a case's expectations, `runner` serves each
case's Ingresses through the agent and reports.
"""
