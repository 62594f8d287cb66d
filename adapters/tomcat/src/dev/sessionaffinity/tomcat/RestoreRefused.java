package dev.sessionaffinity.tomcat;

/** A restore state the valve will not use; the request is answered "unknown session". */
final class RestoreRefused extends Exception {

    private static final long serialVersionUID = 1L;

    enum Reason {
        /** Not in the state format: bad base64, unknown version, truncated, too big. */
        MALFORMED(Counter.RESTORES_REFUSED_MALFORMED),
        /** No key verifies it: unsigned, tampered, or signed with a key this app does not have. */
        SIGNATURE(Counter.RESTORES_REFUSED_SIGNATURE),
        /** Validly signed, but for another session id or another web app. */
        OTHER_SESSION(Counter.RESTORES_REFUSED_OTHER_SESSION),
        /** The session was idle longer than its max inactive interval. */
        EXPIRED(Counter.RESTORES_REFUSED_EXPIRED);

        final Counter counter;

        Reason(Counter counter) {
            this.counter = counter;
        }
    }

    final Reason reason;

    RestoreRefused(Reason reason, String detail) {
        super(detail, null, false, false);
        this.reason = reason;
    }
}
