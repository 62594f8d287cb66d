package dev.sessionaffinity.demo;

import java.io.IOException;
import java.io.PrintWriter;
import java.util.Map;

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import jakarta.servlet.http.HttpSession;

/**
 * The cart as an HTML page with a form, for a real browser: GET /shop shows
 * it, POST /shop (item) adds to it and shows it again.
 */
public final class PageServlet extends HttpServlet {

    private static final long serialVersionUID = 1L;

    @Override
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws IOException {
        render(request, request.getSession(), response);
    }

    @Override
    protected void doPost(HttpServletRequest request, HttpServletResponse response) throws IOException {
        HttpSession session = request.getSession();
        ApiServlet.cart(session).add(request.getParameter("item"), 1);
        render(request, session, response);
    }

    private static void render(HttpServletRequest request, HttpSession session, HttpServletResponse response)
            throws IOException {
        response.setContentType("text/html;charset=UTF-8");
        response.setHeader("Cache-Control", "no-store");
        PrintWriter page = response.getWriter();
        page.println("<!doctype html><html><head><title>Cart</title></head><body>");
        page.println("<h1>Cart</h1><ul id=\"cart\">");
        for (Map.Entry<String, Integer> line : ApiServlet.cart(session).items().entrySet()) {
            page.println("<li data-item=\"" + escape(line.getKey()) + "\">" + escape(line.getKey()) + " &times; "
                    + line.getValue() + "</li>");
        }
        page.println("</ul><p>Served by <span id=\"served-by\">" + ApiServlet.servedBy(request) + "</span></p>");
        page.println("<form method=\"post\" action=\"/shop\">");
        page.println("<input name=\"item\" id=\"item\"><button id=\"add\" type=\"submit\">Add</button></form>");
        page.println("</body></html>");
    }

    private static String escape(String text) {
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\"", "&quot;");
    }
}
