package dev.sessionaffinity.demo;

import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.security.SecureRandom;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Set;

import jakarta.servlet.AsyncContext;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import jakarta.servlet.http.HttpSession;

import javax.management.JMException;
import javax.management.MBeanAttributeInfo;
import javax.management.MBeanServer;
import javax.management.ObjectName;

/**
 * The demo's JSON API: a cart in the HttpSession, login and logout, and the
 * session shapes the adapter must handle (a non-Serializable attribute, a big
 * state, a response committed before the session changes, a short timeout).
 *
 * <pre>
 * GET  /cart         the session as JSON (reads only), and which Tomcat answered
 * POST /cart/add     item, qty: add to the cart (changes a nested object in place)
 * POST /login        user: changeSessionId(), then remember the user
 *                    (style=replace: the older idiom, invalidate() and a new session)
 * POST /logout       invalidate the session
 * POST /helper       store a non-Serializable attribute
 * POST /big          kb: store kb KiB of random bytes (0 removes them)
 * POST /flush        item: commit the response, then add item to the cart
 *                    (then=logout: commit the response, then invalidate the session)
 * POST /async        item: add to the cart from another thread (startAsync)
 * POST /ttl          seconds: the session's max inactive interval
 * GET  /counters     the SessionAffinityValve's JMX counters
 * GET  /healthz      200 while the app is up
 * </pre>
 */
public final class ApiServlet extends HttpServlet {

    private static final long serialVersionUID = 1L;
    private static final SecureRandom RANDOM = new SecureRandom();

    @Override
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws IOException {
        switch (request.getServletPath()) {
            case "/healthz":
                send(response, Map.of("status", "ok"));
                break;
            case "/counters":
                send(response, counters());
                break;
            case "/cart":
                send(response, view(request, request.getSession()));
                break;
            default:
                response.sendError(404);
        }
    }

    @Override
    protected void doPost(HttpServletRequest request, HttpServletResponse response) throws IOException {
        HttpSession session = request.getSession();
        switch (request.getServletPath()) {
            case "/cart/add":
                cart(session).add(request.getParameter("item"), quantity(request));
                break;
            case "/login":
                session = login(request, session);
                break;
            case "/logout":
                session.invalidate();
                send(response, Map.of("logged_out", true));
                return;
            case "/helper":
                session.setAttribute("helper", new RenderHelper());
                break;
            case "/big":
                big(session, Integer.parseInt(request.getParameter("kb")));
                break;
            case "/flush":
                flushThenAdd(request, response, session);
                return;
            case "/async":
                addLater(request, session);
                return;
            case "/ttl":
                session.setMaxInactiveInterval(Integer.parseInt(request.getParameter("seconds")));
                break;
            default:
                response.sendError(404);
                return;
        }
        send(response, view(request, session));
    }

    static Cart cart(HttpSession session) {
        Cart cart = (Cart) session.getAttribute("cart");
        if (cart == null) {
            cart = new Cart();
            session.setAttribute("cart", cart);
        }
        return cart;
    }

    /** A new session id against session fixation, the Servlet 3.1 way or the older one. */
    private static HttpSession login(HttpServletRequest request, HttpSession session) {
        HttpSession loggedIn = session;
        if ("replace".equals(request.getParameter("style"))) {
            session.invalidate();
            loggedIn = request.getSession(true);
        } else {
            request.changeSessionId();
        }
        loggedIn.setAttribute("user", request.getParameter("user"));
        return loggedIn;
    }

    /** The response is written and the session changed by another thread, after the servlet returned. */
    private static void addLater(HttpServletRequest request, HttpSession session) {
        String item = request.getParameter("item");
        AsyncContext async = request.startAsync();
        async.start(() -> {
            try {
                cart(session).add(item, 1);
                send((HttpServletResponse) async.getResponse(), view(request, session));
            } catch (IOException e) {
                request.getServletContext().log("demo: the async answer failed", e);
            } finally {
                async.complete();
            }
        });
    }

    private static int quantity(HttpServletRequest request) {
        String qty = request.getParameter("qty");
        return qty == null ? 1 : Integer.parseInt(qty);
    }

    private static void big(HttpSession session, int kb) {
        if (kb <= 0) {
            session.removeAttribute("report");
            return;
        }
        byte[] report = new byte[kb * 1024];
        RANDOM.nextBytes(report); // incompressible, so the state really is this big
        session.setAttribute("report", report);
    }

    /** The body goes out (committing the headers) before the session changes. */
    private static void flushThenAdd(HttpServletRequest request, HttpServletResponse response, HttpSession session)
            throws IOException {
        response.setContentType("application/json");
        response.getWriter().write("{\"committed_first\":true,\"served_by\":\"" + servedBy(request) + "\",");
        response.flushBuffer();
        if ("logout".equals(request.getParameter("then"))) {
            session.invalidate();
            response.getWriter().write("\"logged_out\":true}\n");
            return;
        }
        cart(session).add(request.getParameter("item"), quantity(request));
        response.getWriter().write("\"session\":" + Json.of(view(request, session)) + "}\n");
    }

    /** The session as JSON, and which Tomcat answered (the proxy strips x-instance-id from what clients see). */
    static Map<String, Object> view(HttpServletRequest request, HttpSession session) {
        Map<String, Object> view = new LinkedHashMap<>();
        view.put("served_by", servedBy(request));
        view.put("session", session.getId());
        view.put("user", session.getAttribute("user"));
        view.put("items", cart(session).items());
        view.put("helper", session.getAttribute("helper") != null);
        byte[] report = (byte[]) session.getAttribute("report");
        view.put("report_bytes", report == null ? 0 : report.length);
        view.put("max_inactive", session.getMaxInactiveInterval());
        return view;
    }

    /** This Tomcat's connector address, e.g. 127.0.0.1:18081. */
    static String servedBy(HttpServletRequest request) {
        return request.getLocalAddr() + ":" + request.getLocalPort();
    }

    /** Reads the valve's counters the way any JMX client would. */
    private static Map<String, Object> counters() {
        MBeanServer server = ManagementFactory.getPlatformMBeanServer();
        Map<String, Object> values = new LinkedHashMap<>();
        try {
            Set<ObjectName> names = server.queryNames(new ObjectName("*:type=SessionAffinity,*"), null);
            for (ObjectName name : names) {
                for (MBeanAttributeInfo attribute : server.getMBeanInfo(name).getAttributes()) {
                    values.put(attribute.getName(), server.getAttribute(name, attribute.getName()));
                }
            }
        } catch (JMException e) {
            values.put("error", e.toString());
        }
        return values;
    }

    private static void send(HttpServletResponse response, Map<String, ?> body) throws IOException {
        response.setContentType("application/json");
        response.setCharacterEncoding("UTF-8");
        response.setHeader("Cache-Control", "no-store");
        response.getWriter().write(Json.of(body) + "\n");
    }
}
