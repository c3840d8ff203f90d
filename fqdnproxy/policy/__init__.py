"""Policies: CiliumNetworkPolicy YAML, loaded, compiled per endpoint, and decided on.

Modules, in the order data flows::

    policies/*.yaml ──load.py (document.py)──> model.PolicySet ──┐
    endpoints.yaml ──endpoints.py──> Registry ───────────────────┴─engine.py──> EndpointPolicy
                                                   (match.py)  .decide(server, port, proto, name)
                                                               .select(name) -> PortSet | None
    reload.py: watches both, validates, swaps atomically, reports changed selections
    commands.py: the bodies of ``fqdnproxy policy check`` and ``fqdnproxy policy explain``

Rule semantics (Cilium's, see DESIGN.md "Policy semantics")
------------------------------------------------------------

Who is enforced
    A policy's ``endpointSelector`` picks endpoints by label. A CiliumNetworkPolicy selects
    endpoints of its own namespace only (``metadata.namespace``, ``default`` when absent); a
    CiliumClusterwideNetworkPolicy selects in every namespace. An endpoint selected by any policy
    with ``egress`` or ``egressDeny`` rules is default-deny for egress. An endpoint no such policy
    selects is not enforced at all: every query is allowed and the datapath passes its traffic,
    which is Cilium's default-allow for unselected endpoints. ``enableDefaultDeny.egress: false``
    on every selecting policy keeps the endpoint default-allow (a wildcard allow) while its denies
    still apply.

Labels
    Selector keys may carry a source: ``k8s:app``, ``any:app`` or plain ``app`` (which means
    ``any``). Inventory labels are ``k8s`` labels. Every endpoint carries
    ``k8s:io.kubernetes.pod.namespace``. matchExpressions support In, NotIn, Exists, DoesNotExist.

Peers (egress rule fields; at most one per rule, as in Cilium)
    ``toEndpoints``   endpoints of the inventory by label; in a namespaced policy only those of
                      the policy's namespace unless the selector names the namespace label. A DNS
                      service such as kube-dns is an inventory entry of ``kind: service`` in
                      ``kube-system`` with ``k8s-app: kube-dns``, so the usual selector matches
                      the cluster DNS server's addresses.
    ``toCIDR``/``toCIDRSet`` addresses, with ``except``.
    ``toEntities``    ``all`` (everything), ``world`` (every address not in the inventory),
                      ``world-ipv4``, ``world-ipv6``.
    ``toFQDNs``       IPs learned from answers for names the selectors match.
    none              with ``toPorts``: every peer on those ports; without: nothing (``{}``).
    empty list        an error. Cilium reads ``toFQDNs: []`` (any empty peer list) as absent, so
                      with toPorts it would be the L4-only rule above, every destination on those
                      ports, which is never what ``[]`` looks like it says. In egressDeny it would
                      deny every destination on those ports. Remove the key to mean "none".
    ``toPorts``: port (0 = all), endPort, protocol TCP, UDP or ANY (default ANY).

DNS queries
    A query to server S, port P, is allowed if a rule whose peer covers S and whose toPorts cover
    P has a ``rules.dns`` selector matching the name. A covering rule without ``rules.dns`` allows
    every name, as Cilium does when no DNS proxy rule applies. ``rules: {}``, ``dns: []`` and
    ``dns: null`` load the same way, with a warning: Cilium documents them as "if omitted or
    empty, no layer 7 rules are enforced" (PortRule.rules), so rejecting them would refuse valid
    Cilium policies, but ``[]`` reads like "no names", so the warning names the explicit spelling,
    ``dns: [{matchPattern: "*"}]``. They only widen within the rule's own peer and ports.

Denies win
    ``egressDeny`` toFQDNs (fqdnproxy's extension): the name is refused at DNS and its IPs are
    never learned, even if a pattern allows it. egressDeny toCIDR/toCIDRSet (with toPorts):
    queries to a covered server are refused, and the datapath drops the traffic.

Name matching (``match.py``)
    Lowercase, trailing dot. matchName is exact. In matchPattern, ``*`` is zero or more of
    ``[-a-z0-9_]`` within one label, a leading ``**.`` is one or more whole labels, an all-``*``
    pattern matches every name. ``[-a-zA-Z0-9_.*]`` only, at most 255 characters. All of an
    endpoint's selectors compile into one ``NameMatcher`` (exact dict plus reversed-label trie).

Metadata
    Only Kubernetes ObjectMeta fields (name, namespace, labels, annotations, uid, ...): a typo such
    as ``namespce: prod`` is an error, not a policy silently placed in ``default``. name and
    namespace are strings, labels and annotations maps of strings.

What is rejected
    Anything not listed above is an error naming the field: rules.http and other L7 rules,
    toServices, toGroups, toNodes, icmps, named ports, SCTP, nodeSelector, reserved: labels,
    entities other than world/all, empty peer lists, unknown metadata fields. ``ingress`` and
    ``ingressDeny`` load with a warning: fqdnproxy enforces egress only.

An empty policy set
    Paths that load no policy at all (no ``*.yaml``/``*.yml`` files, or files holding no policy
    document) are an error, at first load, in ``policy check`` and on reload, where the previous
    version keeps serving: an empty set would stop enforcement for every endpoint, and is what a
    non-atomic ``rm *; cp new/* .`` looks like halfway. To enforce nothing on purpose, keep a
    policy whose endpointSelector selects no endpoint.
"""
