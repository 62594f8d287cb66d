package dev.sessionaffinity.tomcat;

/** What the valve counts; each is a JMX attribute of the valve's counters MBean. */
enum Counter {
    SESSIONS_CREATED("sessionsCreated", "Sessions created on the proxy's x-session-new"),
    SESSIONS_RESTORED("sessionsRestored", "Sessions recreated from an x-session-state the proxy sent"),
    SESSIONS_UNKNOWN("sessionsUnknown", "Requests for a session not known here, answered unknown without running the app"),
    STOPPING_ANSWERS("stoppingAnswers", "Session requests answered 503 \"unreached\" while the context stopped, so the proxy moved them"),
    SESSIONS_ENDED("sessionsEnded", "Sessions the app ended (invalidate, logout), announced with x-session-end"),
    SESSIONS_ROTATED("sessionsRotated", "Session id changes (changeSessionId, login), announced with x-session-rotate"),
    REQUESTS_UNTOUCHED("requestsUntouched", "Requests of a session that never asked for it (getSession): nothing serialized"),
    STATES_SENT("statesSent", "Changed states sent in a response header"),
    STATES_SENT_IN_TRAILERS("statesSentInTrailers", "Changed states sent in a trailer (the response was already committed)"),
    CHANGES_DEFERRED("changesDeferred",
            "Changes that could not be announced: a committed response without trailers, or a file sent with sendfile (a state goes with the session's next response)"),
    STATES_OVERSIZED("statesOversized", "States over maxStateBytes: sent without attributes"),
    ATTRIBUTES_SKIPPED("attributesSkipped",
            "Attributes left out of a state: not Serializable, or holding a class outside allowedClasses"),
    ATTRIBUTES_NOT_RESTORED("attributesNotRestored",
            "Attributes left out of a restored session: a class outside allowedClasses or not found here, or over the limits"),
    SERIALIZATION_FAILURES("serializationFailures", "States not sent because serializing the attributes failed"),
    UNTRUSTED_SENDERS("untrustedSenders", "Requests with session headers from an address internalProxies does not match (served like plain Tomcat)"),
    INVALID_SESSION_IDS("invalidSessionIds", "Requests whose x-session-id is not in the proxy's format (served like plain Tomcat)"),
    RESTORES_REFUSED_MALFORMED("restoresRefusedMalformed", "Restore states refused: not in the state format"),
    RESTORES_REFUSED_SIGNATURE("restoresRefusedSignature", "Restore states refused: unsigned, tampered, or signed with an unknown key"),
    RESTORES_REFUSED_OTHER_SESSION("restoresRefusedOtherSession", "Restore states refused: signed for another session id or web app"),
    RESTORES_REFUSED_EXPIRED("restoresRefusedExpired", "Restore states refused: the session had expired (answered with x-session-end)");

    final String attribute;
    final String description;

    Counter(String attribute, String description) {
        this.attribute = attribute;
        this.description = description;
    }
}
