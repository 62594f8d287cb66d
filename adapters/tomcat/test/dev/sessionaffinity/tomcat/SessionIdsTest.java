package dev.sessionaffinity.tomcat;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertTrue;

import java.util.HashSet;
import java.util.Set;

import org.junit.Test;

public class SessionIdsTest {

    @Test
    public void idsHaveTheProxyFormatAndDoNotRepeat() {
        SessionIds generator = new SessionIds();
        generator.setJvmRoute("node1");
        Set<String> seen = new HashSet<>();
        for (int i = 0; i < 10_000; i++) {
            String id = i % 2 == 0 ? generator.generateSessionId() : generator.generateSessionId("node1");
            assertTrue(id, SessionIds.isSessionId(id));
            assertTrue("repeated id " + id, seen.add(id));
        }
        assertEquals(16, generator.getSessionIdLength());
    }

    @Test
    public void theFormatIsExactly22Base64urlCharacters() {
        assertTrue(SessionIds.isSessionId("AZaz09_-AZaz09_-AZaz09"));
        assertFalse(SessionIds.isSessionId("AZaz09_-AZaz09_-AZaz0"));
        assertFalse(SessionIds.isSessionId("AZaz09_-AZaz09_-AZaz09A"));
        assertFalse(SessionIds.isSessionId("AZaz09_-AZaz09_-AZaz0="));
        assertFalse(SessionIds.isSessionId("AZaz09_-AZaz09_-AZaz0+"));
        assertFalse(SessionIds.isSessionId("0123456789ABCDEF0123456789ABCDEF")); // Tomcat's own format
        assertFalse(SessionIds.isSessionId(null));
    }
}
