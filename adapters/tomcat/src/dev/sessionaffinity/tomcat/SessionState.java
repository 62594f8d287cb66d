package dev.sessionaffinity.tomcat;

/**
 * One session as the proxy carries it: the session it belongs to, Tomcat's
 * session metadata, and the attributes in Java serialization form.
 */
final class SessionState {

    final String sessionId;
    /** The Tomcat context (web app) the state was made by: "" for ROOT, else "/path". */
    final String context;
    final long creationTime;
    /** When the session was last used as far as this state knows (ms since the epoch). */
    final long lastAccessedTime;
    /** Seconds; 0 or less means the session never expires for inactivity. */
    final int maxInactiveInterval;
    final byte[] attributes;

    SessionState(String sessionId, String context, long creationTime, long lastAccessedTime,
            int maxInactiveInterval, byte[] attributes) {
        this.sessionId = sessionId;
        this.context = context;
        this.creationTime = creationTime;
        this.lastAccessedTime = lastAccessedTime;
        this.maxInactiveInterval = maxInactiveInterval;
        this.attributes = attributes;
    }

    /** True if Tomcat would have expired this session for inactivity by time now. */
    boolean expiredAt(long now) {
        return maxInactiveInterval > 0 && now - lastAccessedTime >= maxInactiveInterval * 1000L;
    }
}
