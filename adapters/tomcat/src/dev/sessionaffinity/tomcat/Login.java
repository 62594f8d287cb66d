package dev.sessionaffinity.tomcat;

import java.io.Serializable;
import java.security.Principal;
import java.util.Arrays;
import java.util.List;

import org.apache.catalina.Session;
import org.apache.catalina.realm.GenericPrincipal;

/**
 * A container login (FORM, BASIC, ...) that Tomcat caches in the session, as
 * it travels in the state: the user's name, roles and auth type, so the user
 * stays logged in after a failover (what Tomcat's persistAuthentication does
 * for persisted sessions). Only a GenericPrincipal (what Tomcat's realms make)
 * travels; its realm-specific user object does not.
 */
final class Login implements Serializable {

    private static final long serialVersionUID = 1L;
    /** The reserved attribute name the login travels under; it never becomes a session attribute. */
    static final String ATTRIBUTE = Login.class.getName();

    private final String name;
    private final String[] roles;
    private final String authType;

    private Login(String name, String[] roles, String authType) {
        this.name = name;
        this.roles = roles;
        this.authType = authType;
    }

    /** The session's cached login, or null if none or not a GenericPrincipal. */
    static Login of(Session session) {
        Principal principal = session.getPrincipal();
        if (!(principal instanceof GenericPrincipal)) {
            return null;
        }
        GenericPrincipal user = (GenericPrincipal) principal;
        return new Login(user.getName(), user.getRoles().clone(), session.getAuthType());
    }

    /** Puts this login back into a restored session. */
    @SuppressWarnings("deprecation") // the one constructor Tomcat 9 and 10.1 share
    void restoreInto(Session session) {
        session.setAuthType(authType);
        session.setPrincipal(new GenericPrincipal(name, null, List.copyOf(Arrays.asList(roles))));
    }
}
